"""Dry-run plans (seqtool.plan): shapes and parameter counts equal the real conversions', unmodelled steps fail
with one line, and predicted peaks are within 20 % or 16 MiB of the peaks measured on ``ref`` (one process per step,
see seqtool.plan.measure)."""
import json

import pytest
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.plan import UnpredictableStepError, plan_recipe
from seqtool.plan.measure import REF_STEPS, measure_peak

MiB = 2**20

@pytest.fixture(scope="module")
def ref_peaks():
    """Measured peaks of REF_STEPS, each in a fresh process (seqtool.plan.measure: peak-RSS increase after a
    warm-up on tiny-llama); two processes at a time (they measure their own RSS, so they do not disturb each other)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda step: measure_peak("ref", step[0], step[1], warmup_options=step[2]), REF_STEPS))


@pytest.mark.parametrize("index", range(len(REF_STEPS)), ids=[c for c, _, _ in REF_STEPS])
def test_predicted_peak_matches_measured_on_ref(index, ref_peaks):
    command, options, _ = REF_STEPS[index]
    predicted = plan_recipe("ref", [(command, options)]).steps[0].peak_bytes
    measured = ref_peaks[index]["peak_bytes"]
    bar = max(0.2 * measured, 16 * MiB)
    assert abs(predicted - measured) <= bar, (
        f"{command}: predicted {predicted / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB")


def test_chain_shapes_equal_the_real_conversions(tmp_path):
    from seqtool.convert import convert
    from seqtool.convert.pipeline import prune_model

    plan = plan_recipe("tiny-llama", [("prune", {"ratio": 0.3, "criterion": "magnitude"}),
                                      ("convert", {"to": "gqa", "kv_heads": 1}),
                                      ("eval", {"task": "ppl", "seq_len": 256})])
    pruned = prune_model("tiny-llama", 0.3, criterion="magnitude", output=tmp_path / "p")
    gqa = convert(str(tmp_path / "p"), "gqa", kv_heads=1)
    prune_step, gqa_step, eval_step = plan.steps
    assert prune_step.params_after == pruned.after.params_total
    assert prune_step.changes["intermediate"] == [128, pruned.after.intermediate]
    assert prune_step.params_delta == pruned.after.params_total - pruned.before.params_total
    assert gqa_step.params_before == pruned.after.params_total
    assert gqa_step.params_after == gqa.after.params_total
    assert gqa_step.changes["kv_heads"] == [pruned.after.kv_heads, 1]
    # the pruned checkpoint is saved in fp32 (the preset's dtype), the next steps run in it
    assert gqa_step.kv_bytes_per_token == gqa.after.kv_cache_bytes_per_token
    assert eval_step.kv_bytes_per_token == gqa_step.kv_bytes_per_token and eval_step.tokens == 256
    assert eval_step.recurrent_state_bytes == 0
    text = plan.render()
    assert "peak memory" in text and "kv_heads" in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["peak_bytes"] == max(s["peak_bytes"] for s in data["steps"])


def test_plan_allocates_no_weights():
    """An 8B model (16 GB of bf16 weights) is planned from its config: the process grows by far less."""
    from seqtool.profile.memory import current_rss

    before = current_rss()
    plan = plan_recipe("llama-3.1-8b", [("profile", {"seq_len": "32k"})])
    assert current_rss() - before < 300 * MiB
    step = plan.steps[0]
    assert step.params_after > 8e9 and step.peak_parts["weights"] >= 2 * step.params_after  # bf16
    assert step.peak_parts["kv cache"] == 32 * 2 * 8 * 128 * 2 * (32768 + 32)


@pytest.mark.parametrize("steps,message", [
    ([("distill", {})], "no memory plan"),
    ([("eval", {"task": "passkey"})], "only the ppl task"),
    ([("convert", {"to": "hybrid"})], "only --to gqa"),
    ([("prune", {"ratio": 0.2, "recover": "lora"})], "--recover lora is not modelled"),
    ([("profile", {"attn": "streaming:budget=64"})], "is not modelled"),
    ([("profile", {"bogus": 1})], "bogus"),
    ([("finetune", {"steps": 1, "loss": "lm=1,match=1", "teacher": "tiny-llama"})], "only the lm and kl"),
])
def test_unmodelled_steps_fail_with_one_line(steps, message):
    with pytest.raises(UnpredictableStepError) as info:
        plan_recipe("tiny-llama", steps)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_profile_dry_run_cli_json_and_table():
    runner = CliRunner()
    result = runner.invoke(app, ["profile", "tiny-llama", "--seq-len", "1k", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    step = data["steps"][0]
    assert step["command"] == "profile" and step["tokens"] == 1024 + 32 and step["peak_bytes"] > 0
    table = runner.invoke(app, ["prune", "tiny-llama", "--ratio", "0.3", "--dry-run"])
    assert table.exit_code == 0, table.output
    assert "peak memory" in table.stdout
    for args in (["convert", "tiny-llama", "--to", "gqa", "--kv-heads", "2"], ["finetune", "tiny-llama", "--steps", "3"],
                 ["eval", "tiny-llama", "--task", "ppl", "--seq-len", "512"]):
        out = runner.invoke(app, [*args, "--dry-run", "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["steps"][0]["command"] == args[0]
    bad = runner.invoke(app, ["eval", "tiny-llama", "--task", "passkey", "--dry-run"])
    assert bad.exit_code != 0 and "only the ppl task" in bad.output
