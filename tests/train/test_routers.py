"""Mixing on the engine: --train router / experts select only routing / expert weights; the balance and z-loss
terms reach the loss through the aux-loss hook; the losses' formulas on known router logits."""
from __future__ import annotations

import math

import pytest
import torch

import seqtool
from seqtool.convert import convert
from seqtool.errors import BadInputError
from seqtool.train.kinds import kind_modules
from seqtool.train.routers import balance_loss, z_loss


def test_router_loss_formulas():
    uniform = torch.zeros(6, 4)
    assert balance_loss(uniform, 0).item() == pytest.approx(1.0)  # soft router, perfectly balanced
    collapsed = torch.tensor([[10.0, 0, 0, 0]] * 6)
    assert balance_loss(collapsed, 1).item() > 3.9  # every token on expert 0: E · 1 · ~1
    assert z_loss(uniform).item() == pytest.approx(math.log(4) ** 2)


@pytest.mark.parametrize("to", ["moe", "bam"])
def test_train_router_changes_only_routers_and_logs_aux_losses(to, domain_file, tmp_path):
    model = convert("tiny-llama", to, experts=2).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    routers = kind_modules(model, "router")["router"]
    assert len(routers) == (2 if to == "moe" else 4)  # BAM: an attention and an FFN router per layer
    result = seqtool.finetune(model, data=str(domain_file), steps=2, seq_len=32, batch=2, lr=1e-2, method="full",
                              train="router", loss="lm=1,balance=0.1,zloss=0.01", progress="off",
                              tokenizer=seqtool.load("tiny-llama").tokenizer, output=tmp_path / "mixed")
    assert result.loss_first["loss_balance"] > 0 and result.loss_first["loss_zloss"] > 0
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(any(n.startswith(r + ".") for r in routers) for n in changed), changed
    reloaded = seqtool.load(str(tmp_path / "mixed"), dtype="fp32").model  # the saved native / BAM checkpoint
    ids = torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    experts = kind_modules(model, "experts")["experts"]
    assert experts == [f"model.layers.{i}.mlp.experts" for i in range(2)]


def test_router_kind_on_a_dense_model_is_one_line_error():
    with pytest.raises(BadInputError, match="has no routers"):
        kind_modules(seqtool.load("tiny-llama").model, "router")
