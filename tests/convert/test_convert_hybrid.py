"""`convert --to hybrid`: exact when every layer stays attention (plain-transformers reload), Mamba2 init from
attention weights, cached decode == one forward, layer choice by retrieval score, one-line errors."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from typer.testing import CliRunner

import seqtool
from convert_helpers import fresh, logits, plain_transformers_logits
from seqtool.arch.io import load_model
from seqtool.cli.app import app
from seqtool.convert.hybrid_layers import (choose_layers, count_for_fraction, needle_scores, parse_layers,
                                           retrieval_scores)
from seqtool.convert.hybrid_native import A_RANGE, DT_FLOOR, DT_RANGE, build_native_hybrid
from seqtool.convert.layout import read_attention
from seqtool.errors import BadInputError, UnsupportedModelError

runner = CliRunner()
INIT_ONLY = {"steps1": 0, "steps2": 0}
EXACT_FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-phi3"]  # qwen2: biases; phi3: fused q/k/v


def test_every_layer_kept_is_exact_after_plain_reload(tmp_path, ids):
    dirs, expected = [], []
    for family in EXACT_FAMILIES:
        loaded = fresh(family)
        want = logits(loaded.model, ids)
        result = seqtool.convert(loaded, "hybrid", mixer="mamba2", attention_layers=[0, 1], output=tmp_path / family,
                                 **INIT_ONLY)
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == "granitemoehybrid" and config["architectures"] == ["GraniteMoeHybridForCausalLM"]
        assert config["layer_types"] == ["full_attention", "full_attention"]
        assert config["seqtool"]["steps"][-1]["to"] == "hybrid"
        assert torch.equal(logits(result.model, ids), want)
        dirs.append(tmp_path / family)
        expected.append(want)
    for want, got in zip(expected, plain_transformers_logits(dirs, ids, tmp_path)):
        assert got["class"] == "GraniteMoeHybridForCausalLM"
        torch.testing.assert_close(got["logits"], want, rtol=0, atol=1e-6)


def test_mamba_init_follows_mamba_in_the_llama():
    """x←V, B←K (KV heads repeated over their query heads), C←Q, out←O; dt and A in the paper's ranges."""
    model = fresh("tiny-mistral").model  # 4 query heads, 2 KV heads: GQA repeat
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hybrid = build_native_hybrid(model, [0], seed=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # source untouched
    from seqtool.arch.registry import get_family

    w = read_attention(model.model.layers[1].self_attn, get_family(model), 4, 16)
    mamba = hybrid.model.layers[1].mamba
    assert hybrid.model.layers[1].self_attn is None and hybrid.model.layers[0].mamba is None
    z, x, b, c, dt = mamba.in_proj.weight.split([64, 64, 64, 64, 4])
    rep = lambda t: t.view(2, 16, -1).repeat_interleave(2, 0).reshape(64, -1)  # noqa: E731
    assert torch.equal(x, rep(w.v)) and torch.equal(b, rep(w.k)) and torch.equal(c, w.q)
    assert torch.equal(mamba.out_proj.weight, w.o)
    assert torch.equal(mamba.conv1d.weight[:, 0, -1], torch.ones(mamba.conv1d.weight.shape[0]))
    step = torch.nn.functional.softplus(mamba.dt_bias)
    assert (step >= max(DT_RANGE[0], DT_FLOOR) * 0.999).all() and (step <= DT_RANGE[1] * 1.001).all()
    a = mamba.A_log.exp()
    assert (a >= A_RANGE[0]).all() and (a <= A_RANGE[1]).all() and torch.equal(mamba.D, torch.ones(4))
    again = build_native_hybrid(model, [0], seed=3)
    assert all(torch.equal(p, q) for p, q in zip(hybrid.parameters(), again.parameters()))  # seeded


@torch.no_grad()
def test_mamba2_prefill_then_decode_equals_one_forward():
    model = fresh("tiny-qwen2").model  # biases go into in_proj / out_proj too
    hybrid = build_native_hybrid(model, [1])
    ids = torch.randint(4, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    full = hybrid(ids).logits
    out = hybrid(ids[:, :13], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(13, 21):
        out = hybrid(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    gen = hybrid.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    nocache = hybrid.generate(ids[:, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(gen, nocache)


def test_layer_choice_ranks_layers_by_retrieval_score():
    model = load_model("ref", device="cpu", dtype="fp32").model  # trained: has induction heads
    scores = retrieval_scores(model)
    choice = choose_layers(model, 4, attention_layers=None, keep_attention=0.5)
    kept = choice.attention_layers
    assert len(kept) == 2 and min(scores[i] for i in kept) >= max(scores[i] for i in range(4) if i not in kept)
    from seqtool.patches.razor import find_retrieval_heads

    best_head_layer = int(find_retrieval_heads(model, 1 / (4 * 8))[0].split(".")[0])
    assert best_head_layer in kept  # the layer of razor's top retrieval head is kept
    assert "retrieval" in choice.describe()[-1] and choice.scores == [round(s, 4) for s in scores]
    tok = load_model("ref", device="cpu", dtype="fp32").tokenizer
    needle = needle_scores(model, tok, samples=2, seq_len=256)
    # ref answers passkeys from its last two layers: they put most attention on the needle while answering
    assert min(needle[2:]) > 0.9 and max(needle[:2]) < 0.7, needle
    assert count_for_fraction(0.25, 2) == 1 and count_for_fraction(0.0, 4) == 0 and count_for_fraction(1.0, 3) == 3
    assert parse_layers("3, 0,3") == [0, 3]
    with pytest.raises(BadInputError, match="comma-separated"):
        parse_layers("0;3")


def test_library_errors():
    with pytest.raises(UnsupportedModelError, match="q/k norms"):
        seqtool.convert(fresh("tiny-qwen3"), "hybrid", attention_layers=[0], **INIT_ONLY)
    with pytest.raises(BadInputError, match="either --attention-layers or --keep-attention"):
        seqtool.convert(fresh("tiny-llama"), "hybrid", attention_layers=[0], keep_attention=0.5, **INIT_ONLY)


def test_cli_converts_reloads_generates_and_rejects_bad_input(tmp_path):
    out = tmp_path / "h"
    res = runner.invoke(app, ["convert", "tiny-llama", "--to", "hybrid", "--mixer", "mamba2",
                              "--attention-layers", "1", "--steps1", "0", "--steps2", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "attention layers kept: [1]" in res.stdout and "GraniteMoeHybridForCausalLM" in res.stdout
    model = seqtool.load(str(out), device="cpu").model
    assert model.config.layer_types == ["linear_attention", "full_attention"]
    assert model.generate(torch.tensor([[1, 50, 60, 70]]), max_new_tokens=4, do_sample=False).shape == (1, 8)
    cases = [
        (["--mixer", "rwkv"], "unknown mixer 'rwkv'"),
        (["--attention-layers", "0,2"], "attention layer 2 out of range"),
        (["--keep-attention", "0"], "needs at least one attention layer"),
        (["--attention-layers", ""], "needs at least one attention layer"),
        (["--mixer", "linear", "--window", "0"], "window must be at least 1 token"),
    ]
    for extra, msg in cases:
        res = runner.invoke(app, ["convert", "tiny-llama", "--to", "hybrid", *extra, "-o", str(tmp_path / "x")])
        assert res.exit_code == 2, (extra, res.output)
        lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and msg in lines[0], res.stderr
    res = runner.invoke(app, ["convert", "tiny-qwen3", "--to", "hybrid", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "cannot reproduce this qwen3 model exactly: q/k norms" in res.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- distillation (tiny, a few steps)
@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    from seqtool.convert.calib import builtin_text

    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(builtin_text(20_000))
    return str(path)


def test_two_stage_distillation_trains_the_right_parts_and_resumes_exactly(tmp_path, monkeypatch, small_text):
    from seqtool.convert import hybrid_distill

    # stage 2: 2 steps of 32-token rows, then 1 step of 2 x 48 (the length schedule); no retrieval rows (the tiny
    # tokenizer's prompts do not fit 32 tokens)
    opts = dict(attention_layers=[1], steps1=2, steps2=3, lora_r=2, train_seq_len=32, batch=2, eval_rows=4,
                progress="off", data=small_text, mix_retrieval=0.0, long_seq_len=48, long_batch=1, long_frac=0.34)
    source = fresh("tiny-llama")
    init = seqtool.convert(fresh("tiny-llama"), "hybrid", attention_layers=[1], **INIT_ONLY).model
    assert hybrid_distill.attention_pairs(init, source.model) == {"model.layers.0.mamba": "model.layers.0.self_attn"}
    whole = seqtool.convert(source, "hybrid", run_dir=str(tmp_path / "a"), **opts)
    assert all(p.requires_grad for p in source.model.parameters())  # the teacher is handed back as it came
    s1, s2 = whole.details["stages"]
    assert (s1["stage"], s1["steps"], s2["stage"], s2["steps"]) == (1, 2, 2, 3)
    assert "loss_match" in s1["loss_final"] and {"loss_kl", "loss_match"} <= set(s2["loss_final"])
    assert set(s1["match_rel_final"]) == {"layer0"} and set(s2["match_rel_final"]) == {"layer0", "layer1"}
    run2 = json.loads((tmp_path / "a" / "stage2" / "run.json").read_text())
    assert run2["distill"]["long_seq_len"] == 48 and run2["distill"]["match"] == 1.0
    assert hybrid_distill._phases(hybrid_distill.DistillConfig(
        steps1=2, steps2=3, lora_r=2, seq_len=32, batch=2, lr1=1e-3, lr2=1e-3, long_seq_len=48, long_batch=1,
        long_frac=0.34), 3, long=True) == [(2, 32, 2), (1, 48, 1)]
    assert set(hybrid_distill.layer_pairs(whole.model, source.model)) == {"model.layers.0.mamba",
                                                                          "model.layers.1.self_attn"}
    trained1 = torch.load(tmp_path / "a" / "stage1" / "checkpoint.pt", weights_only=False)["trainable"]
    assert trained1 and all(".mamba." in n for n in trained1)  # stage 1: only the mixers train
    trained2 = torch.load(tmp_path / "a" / "stage2" / "checkpoint.pt", weights_only=False)["trainable"]
    assert any("lora_A" in n for n in trained2) and any(".mamba." in n and "lora" not in n for n in trained2)
    before, final = dict(init.named_parameters()), dict(whole.model.named_parameters())
    assert set(final) == set(before)  # LoRA merged away: the plain native class
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.shared_mlp.input_linear.weight",
                 "model.layers.0.mamba.A_log"):
        assert not torch.equal(final[name], before[name]), name
    assert torch.equal(final["model.embed_tokens.weight"], before["model.embed_tokens.weight"])

    real = hybrid_distill._run_stage

    def killed(stage, trainer):
        if stage == 2:
            trainer.run(max_steps=1)  # one step, checkpoint, then the process "dies"
            raise KeyboardInterrupt
        return real(stage, trainer)

    monkeypatch.setattr(hybrid_distill, "_run_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        seqtool.convert(fresh("tiny-llama"), "hybrid", run_dir=str(tmp_path / "b"), output=tmp_path / "out", **opts)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(hybrid_distill, "_run_stage", real)
    resumed = seqtool.convert(fresh("tiny-llama"), "hybrid", run_dir=str(tmp_path / "b"), resume=True,
                              output=tmp_path / "out", **opts)
    assert [st["resumed_from"] for st in resumed.details["stages"]] == [2, 1]
    for (n, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(q, p), n
    assert (tmp_path / "out" / "config.json").exists()


def test_cli_rejects_data_shorter_than_a_row(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "o"
    res = runner.invoke(app, ["convert", "tiny-llama", "--to", "hybrid", "--attention-layers", "1", "--data",
                              str(short), "--seq-len", "64", "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--seq-len" in lines[0], res.stderr
    assert not out.exists() and not (tmp_path / "o.run").exists()


# ---------------------------------------------------------------- deltanet (seqtool's own class)
@torch.no_grad()
@pytest.mark.parametrize("mixer", ["deltanet", "linear"])
def test_seqtool_mixers_exact_when_kept_decode_equals_forward_and_reload(tmp_path, ids, mixer):
    from transformers import AutoModelForCausalLM

    for family in ("tiny-llama", "tiny-qwen2"):  # qwen2: q/k/v biases, GQA repeat in the mixer
        loaded = fresh(family)
        want = logits(loaded.model, ids)
        res = seqtool.convert(loaded, "hybrid", mixer=mixer, attention_layers=[0, 1], output=tmp_path / family,
                              **INIT_ONLY)
        assert torch.equal(logits(res.model, ids), want)
        importlib.import_module("seqtool.models")  # registers the class with Auto*

        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=torch.float32).eval()
        assert type(reloaded).__name__ == "SeqtoolHybridForCausalLM"
        assert torch.equal(logits(reloaded, ids), want)
    # window 4 < the 13-token prefill: the linear mixer's decode moves tokens from its window into its state
    hybrid = seqtool.convert(fresh("tiny-mistral"), "hybrid", mixer=mixer, attention_layers=[1], window=4,
                             **INIT_ONLY).model
    assert hybrid.config.layer_types == ["linear_attention", "full_attention"]
    assert hybrid.config.mixer_types == [mixer, "attention"]
    from seqtool.arch.registry import layer_kinds

    assert [k.mixer for k in layer_kinds(hybrid.config)] == [mixer, "attention"]
    from seqtool.convert.hybrid_distill import mixer_module_names

    assert mixer_module_names(hybrid) == ["model.layers.0.self_attn"]  # what stage 1 trains
    x = torch.randint(4, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    full = hybrid(x).logits
    out = hybrid(x[:, :13], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(13, 21):
        out = hybrid(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert type(seqtool.load(str(tmp_path / "tiny-llama"), device="cpu").model).__name__ == "SeqtoolHybridForCausalLM"


def test_models_register_lazily():
    import subprocess
    import sys

    code = ("import seqtool\nfrom transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "assert 'seqtool_hybrid' not in CONFIG_MAPPING\nimport seqtool.models\n"
            "assert 'seqtool_hybrid' in CONFIG_MAPPING\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_random_init_ablation_replaces_only_the_projections_read_from_attention():
    source = fresh("tiny-llama")
    for mixer, names in (("mamba2", ("in_proj", "out_proj")), ("linear", ("q_proj", "k_proj", "v_proj", "o_proj"))):
        base = seqtool.convert(source, "hybrid", mixer=mixer, attention_layers=[1], **INIT_ONLY).model
        rand = seqtool.convert(source, "hybrid", mixer=mixer, attention_layers=[1], init="random", **INIT_ONLY).model
        for (name, p), q in zip(base.named_parameters(), rand.parameters()):
            changed = name.startswith("model.layers.0.") and any(f".{n}." in name for n in names)
            assert torch.equal(p, q) != changed, name
    with pytest.raises(BadInputError, match="unknown init 'zeros'"):
        seqtool.convert(fresh("tiny-llama"), "hybrid", attention_layers=[1], init="zeros", **INIT_ONLY)
