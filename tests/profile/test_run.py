"""profile_model end to end in-process on tiny models (scripted clock), plus OOM / estimate / compare paths."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

import seqtool
from seqtool.cli.common import to_jsonable
from seqtool.errors import BadInputError, NotImplementedMethodError
from seqtool.profile import run as run_mod
from seqtool.profile.estimate import estimate_memory
from seqtool.profile.flops import flop_shape, prefill_flops
from seqtool.profile.memory import ChildOutcome
from seqtool.profile.results import OK, OOM, SKIPPED

FAST = dict(decode_tokens=2, warmup=0, repeats=2, isolate=False)


def test_profile_rows_are_consistent(tiny_models, step_clock):
    report = seqtool.profile("tiny-llama", sweep="32,64", batch=2, clock=step_clock, **FAST)
    model = report.models[0]
    assert (model.family, model.dtype, model.attn) == ("llama", "fp32", "sdpa")
    assert model.weight_bytes == 4 * sum(p.numel() for p in tiny_models["tiny-llama"].parameters())
    shape = flop_shape(tiny_models["tiny-llama"])
    assert len(model.rows) == 2
    for row, n in zip(model.rows, (32, 64)):
        assert row.status == OK and row.seq_len == n and row.batch == 2
        assert row.prefill_median_s == pytest.approx(0.25)
        assert row.kv_cache_bytes == row.kv_cache_bytes_dense == 2 * 2 * 4 * 16 * n * 2 * 4
        assert row.prefill_flops == prefill_flops(shape, 2, n)
        assert row.prefill_tflops == pytest.approx(row.prefill_flops / 0.25 / 1e12)
        assert row.peak_memory_bytes is not None and row.estimated_memory_bytes > 0
    env = json.loads(json.dumps(to_jsonable(report)))["environment"]
    assert env["device_type"] == "cpu" and env["threads"] >= 1
    assert env["torch_version"] == torch.__version__ and env["transformers_version"]


def test_oom_row_and_sweep_goes_on(monkeypatch):
    real = run_mod.measure_length

    def measure(model, *, seq_len, **kw):
        if seq_len == 48:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return real(model, seq_len=seq_len, **kw)

    monkeypatch.setattr(run_mod, "measure_length", measure)
    rows = seqtool.profile("tiny-llama", sweep="32,48,64", **FAST).models[0].rows
    assert [r.status for r in rows] == [OK, OOM, OK]
    assert "out of memory" in rows[1].note and rows[1].prefill_median_s is None


def test_isolated_child_killed_gives_oom_row(monkeypatch):
    outcomes = iter([ChildOutcome(None, True, -9, ""), ChildOutcome({"oom": "DefaultCPUAllocator"}, False, 0, "")])
    monkeypatch.setattr(run_mod, "run_in_subprocess", lambda spec: next(outcomes))
    rows = seqtool.profile("tiny-llama", sweep="1k,2k", decode_tokens=2, isolate=True).models[0].rows
    assert [r.status for r in rows] == [OOM, OOM]
    assert "killed" in rows[0].note


def test_length_that_cannot_fit_is_skipped_with_the_estimate(monkeypatch):
    monkeypatch.setattr(run_mod.est, "available_bytes", lambda device: 1000)
    called = []
    monkeypatch.setattr(run_mod, "measure_length", lambda *a, **k: called.append(1))
    row = seqtool.profile("tiny-llama", seq_len=64, **FAST).models[0].rows[0]
    assert row.status == SKIPPED and not called
    assert "estimate" in row.note and row.estimated_memory_bytes > 1000


def test_estimate_parts(tiny_models):
    config = tiny_models["tiny-mistral"].config
    sdpa = estimate_memory(config, weight_bytes=10, bytes_per_element=4, batch=2, seq_len=100, decode_tokens=8, attn="sdpa")
    eager = estimate_memory(config, weight_bytes=10, bytes_per_element=4, batch=2, seq_len=100, decode_tokens=8, attn="eager")
    assert sdpa.kv_cache == 2 * 2 * 2 * 16 * 108 * 2 * 4
    assert eager.activations > sdpa.activations
    assert eager.activations >= 2 * 4 * 100 * 100 * (2 * 4 + 4)  # B·H·T² scores + fp32 softmax
    assert sdpa.total == 10 + sdpa.kv_cache + sdpa.activations


def test_compare_gives_ratios_and_eager_works():
    report = seqtool.profile("tiny-llama", seq_len=32, compare="tiny-mistral", attn="eager", **FAST)
    assert [m.source for m in report.models] == ["tiny-llama", "tiny-mistral"]
    assert all(m.attn == "eager" for m in report.models)
    (ratio,) = report.comparison
    assert ratio.seq_len == 32
    assert ratio.kv_cache_ratio == pytest.approx(0.5)  # 2 KV heads vs 4
    assert ratio.prefill_ratio > 0


def test_breakdown_parts_sum_to_total():
    row = seqtool.profile("tiny-qwen3", seq_len=64, breakdown=True, **FAST).models[0].rows[0]
    parts = row.breakdown_s
    assert set(parts) == {"attention", "mlp", "norms", "lm_head", "other", "total"}
    assert parts["attention"] > 0 and parts["mlp"] > 0 and parts["lm_head"] > 0
    kinds = sum(v for k, v in parts.items() if k != "total")
    assert kinds == pytest.approx(parts["total"], rel=1e-6)


@pytest.mark.parametrize("kwargs, text", [
    (dict(seq_len="32q"), "malformed length"),
    (dict(seq_len="1k", sweep="1k,2k"), "either --seq-len or --sweep"),
    (dict(batch=-1), "--batch"),
    (dict(repeats=0), "--repeats"),
    (dict(dtype="fp8"), "unknown dtype"),
    (dict(clock=lambda: 0.0, isolate=True), "in-process"),
])
def test_bad_input(kwargs, text):
    with pytest.raises(BadInputError, match=text):
        seqtool.profile("tiny-llama", **kwargs)


def test_patch_spec_without_patches_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "seqtool.patches", types.ModuleType("seqtool.patches"))
    with pytest.raises(NotImplementedMethodError, match="sdpa or eager"):
        seqtool.profile("tiny-llama", attn="block_topk:budget=0.25", **FAST)


def test_evicting_patch_shows_kv_savings():
    """--attn with a seqtool patch: the cache comes from seqtool.patches.make_cache and its real tensors are summed."""
    patches = pytest.importorskip("seqtool.patches")
    if not hasattr(patches, "make_cache") or "streaming" not in patches.list_methods():
        pytest.skip("streaming patch not available")
    row = seqtool.profile("tiny-llama", seq_len=512, attn="streaming:budget=128,block=64,sink_blocks=1",
                          **FAST).models[0].rows[0]
    assert row.status == OK
    dense = 2 * 2 * 4 * 16 * 512 * 4
    assert row.kv_cache_bytes_dense == dense
    # only sink + window blocks stay in the cache (how many is the patch's business): far below dense
    assert 0 < row.kv_cache_bytes < dense // 2
