"""Routing balance in `seqtool profile` for MoE checkpoints (per router: expert shares, imbalance)."""
import json

import pytest
import torch
from typer.testing import CliRunner

import seqtool
from seqtool.cli.app import app
from seqtool.profile.routing import expert_shares


def test_expert_shares_hand_cases():
    logits = torch.tensor([[5.0, 1.0, 0.0], [4.0, 0.0, 2.0], [0.0, 3.0, 1.0], [1.0, 0.0, 9.0]])
    assert expert_shares(logits, 1).tolist() == [0.5, 0.25, 0.25]  # argmax: 0, 0, 1, 2
    top2 = expert_shares(logits, 2)  # pairs {0,1}, {0,2}, {1,2}, {2,0}
    assert top2.tolist() == pytest.approx([3 / 8, 2 / 8, 3 / 8])
    soft = expert_shares(torch.zeros(5, 4), 0)  # a soft router with equal logits: every expert 1/4
    assert soft.tolist() == pytest.approx([0.25] * 4)


def test_profile_reports_routing_balance_of_a_moe(tmp_path):
    out = tmp_path / "moe"
    seqtool.convert("tiny-llama", "moe", experts=4, top_k=2, output=str(out))
    res = CliRunner().invoke(app, ["profile", str(out), "--seq-len", "64", "--decode-tokens", "2", "--repeats", "1",
                                   "--warmup", "0", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["models"][0]["rows"][0]
    routing = row["routing"]
    assert len(routing) == 2  # one router per MoE layer of the 2-layer model
    for router in routing:
        assert router["top_k"] == 2 and len(router["shares"]) == 4
        assert sum(router["shares"]) == pytest.approx(1.0, abs=1e-3)
        assert 1.0 <= router["imbalance"] <= 4.0
        assert router["imbalance"] == pytest.approx(4 * max(router["shares"]), abs=1e-3)
    text = CliRunner().invoke(app, ["profile", str(out), "--seq-len", "64", "--decode-tokens", "2", "--repeats", "1",
                                    "--warmup", "0"]).stdout
    assert "routing balance per router" in text


def test_dense_models_have_no_routing_row():
    from seqtool.arch.io import load_model
    from seqtool.profile.measure import measure_length

    model = load_model("tiny-llama", device="cpu").model
    row = measure_length(model, seq_len=16, batch=1, decode_tokens=1, warmup=0, repeats=1)
    assert row["routing"] is None
