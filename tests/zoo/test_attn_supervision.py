"""Attention supervision of the reference-model training: the probe reads the model's real attention, the
multi-question rows point every answer token at the token it copies, and the loss trains the head."""
from pathlib import Path

import pytest
import torch

import seqtool.zoo.train_ref as tr
from seqtool.zoo.attn_supervision import HeadAttentionProbe


def _tiny_llama(attn="eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def test_probe_equals_the_models_attention_probabilities():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    probe = HeadAttentionProbe(model, layer=1, head=3)
    out = model(input_ids=ids, output_attentions=True)
    probs = out.attentions[1][:, 3]  # (B, T, T)
    copies = torch.tensor([[0, 5, 2], [0, 11, 11], [1, 7, 0], [1, 3, 3]])
    got = probe.log_prob(copies).exp()
    want = probs[copies[:, 0], copies[:, 1], copies[:, 2]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    probe.remove()
    with pytest.raises(ValueError, match="head"):
        HeadAttentionProbe(model, layer=1, head=4)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    cfg = tr.TrainConfig.tiny()
    tok, train_ids, _ = tr.prepare_data(cfg, Path(tmp_path_factory.mktemp("data")))
    return tok, train_ids


@pytest.mark.parametrize("kind", ["multiquery", "multiquery_many", "multiquery_first", "multiquery_far"])
def test_multiquery_rows_point_each_answer_token_at_its_needle(tiny_data, kind):
    import numpy as np

    tok, train_ids = tiny_data
    cfg = tr.TrainConfig.tiny()
    cfg.phases = [[1, 1024, 6, {kind: 1.0}]]
    ids, kinds, copies = tr.make_batch(cfg, 0, tok, train_ids)
    assert len(copies) > 0
    questions = 0
    for b, q, k in copies.tolist():
        assert ids[b, q + 1] == ids[b, k] and kinds[b, q + 1] == 2 and k < q
        before = tok.decode(ids[b, :q + 1].tolist())
        asked = before.rsplit("magic number for ", 1)[1].split(" ", 1)[0]
        needle = tok.decode(ids[b, :k + 1].tolist()).rsplit("magic numbers for ", 1)[1]
        assert needle.startswith(asked + " is:")  # copied from the needle whose key was asked
        questions += before.endswith("provided text is")
    # at least one answered question per row; several per row where the prompt leaves room (not ``far``)
    assert questions >= 6 if kind == "multiquery_far" else questions > 6, questions
    if kind in ("multiquery_first", "multiquery_far"):  # first question: the needle that opens the haystack
        for b in range(6):
            text = tok.decode(ids[b].tolist())
            opening = text.split("afterwards.\n\n", 1)[1].split(" is:", 1)[0].rsplit(" ", 1)[1]
            assert text.split("magic number for ", 1)[1].startswith(opening + " mentioned")
            if kind == "multiquery_far":  # ... asked after a prompt of 7/8 of the row or more
                assert copies[copies[:, 0] == b][0, 1] >= 7 * 1024 // 8
    if kind in ("multiquery_many", "multiquery_first"):  # 8-16 needles per haystack: more questions per row
        assert questions >= 4 * 6, questions
    # Passkey rows are supervised too (their value inside the passkey needle).
    cfg.phases = [[1, 640, 4, {"passkey": 1.0}]]
    ids, kinds, copies = tr.make_batch(cfg, 0, tok, train_ids)
    assert sorted(set(copies[:, 0].tolist())) == [0, 1, 2, 3]
    assert all(ids[b, q + 1] == ids[b, k] for b, q, k in copies.tolist())
    assert np.all(kinds.numpy()[copies[:, 0], copies[:, 1] + 1] == 2)


def test_supervision_loss_trains_the_head(tmp_path):
    cfg = tr.TrainConfig.tiny()
    cfg.phases = [[4, 640, 2, {"multiquery": 0.5, "passkey": 0.5}]]
    cfg.attn_supervision, cfg.eval_every, cfg.lr = [1, 2, 1.0], 0, 1e-2
    r = tr.train(cfg, tmp_path / "run", max_steps=4)
    assert r.steps == 4 and r.last_loss["attn"] > 0
    history = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["history"]
    assert "loss_attn_mass" in history[-1]
    # The same batch scored before and after a few supervised steps: the head moves onto its targets.
    tok, train_ids, _ = tr.prepare_data(cfg, tmp_path / "run")
    model = tr.build_model(cfg, tok)
    probe = HeadAttentionProbe(model, 1, 2)
    ids, _, copies = tr.make_batch(cfg, 0, tok, train_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        model(input_ids=ids)
        loss = -probe.log_prob(copies).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_stage_choice_errors(tmp_path):
    from typer.testing import CliRunner

    from seqtool.cli.app import app
    from seqtool.errors import BadInputError

    with pytest.raises(BadInputError, match="choose from retrieval, multikey"):
        tr.make_config(stage="bogus")
    res = CliRunner().invoke(app, ["zoo", "train-ref", "--run-dir", str(tmp_path / "r"), "--init-from",
                                   str(tmp_path), "--stage", "bogus"])
    assert res.exit_code == 2 and "unknown stage" in res.output
    cfg = tr.TrainConfig.multikey_stage("x")
    assert cfg.attn_supervision and "multiquery" in cfg.mix_at(0) and cfg.phase_at(cfg.total_steps - 1)[0] >= 2048
