"""Saves that are killed, raced, or left behind (issue 18): a SIGKILL at every point of a save leaves the old or
the new checkpoint loadable by plain transformers and the next run cleans up; two writers of one output: exactly
one wins; stale temp dirs are removed; outputs keep the input's dtype, the umask, and (--in-place) its other files.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seqtool.arch.io import (BACKUP_SUFFIX, KILL_POINTS, TMP_PREFIX, _publish, load_model, prepare_output,
                             save_model)
from seqtool.errors import OutputExistsError

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# Loads torch once, then forks one writer per kill point (read from stdin) and reports how it ended.
_KILL_DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import seqtool
    src = sys.argv[1]
    loaded = seqtool.load(src)
    for line in sys.stdin:
        point, target = line.split()
        pid = os.fork()
        if pid == 0:
            os.environ["SEQTOOL_KILL_AT"] = point
            try:
                if target == "inplace":
                    seqtool.save(loaded.model, loaded.tokenizer, src, step={"op": "new"}, in_place=True,
                                 source_dir=loaded.path)
                else:
                    seqtool.save(loaded.model, loaded.tokenizer, target, step={"op": "new"}, source_dir=loaded.path)
            finally:
                os._exit(3)  # only reached if the kill point was never hit
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps({"point": point, "signal": sig}), flush=True)
""")


def _plain_ops(path: Path) -> list[str]:
    """Load with plain transformers (no seqtool) and return the recipe ops from config.json."""
    AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return [s["op"] for s in json.loads((path / "config.json").read_text())["seqtool"]["steps"]]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(TMP_PREFIX) or p.name.endswith(BACKUP_SUFFIX))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one writer per kill point")
def test_sigkill_at_every_point_of_a_save(tmp_path):
    loaded = load_model("tiny-llama")
    src = save_model(loaded.model, loaded.tokenizer, tmp_path / "src", step={"op": "old"})
    (src / "eval.json").write_text('{"ppl": 1}')
    assert len(KILL_POINTS) >= 10
    driver = subprocess.Popen([sys.executable, "-c", _KILL_DRIVER, str(src)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        for point in KILL_POINTS:
            fresh = point == "renamed"
            target = tmp_path / f"fresh-{point}"
            driver.stdin.write(f"{point} {target if fresh else 'inplace'}\n")
            driver.stdin.flush()
            report = json.loads(driver.stdout.readline())
            assert report == {"point": point, "signal": 9}, report
            if fresh:
                assert _plain_ops(target)[-1] == "new"
            elif src.exists():
                assert _plain_ops(src)[-1] in ("old", "new"), point
            else:  # killed between the two renames: the old checkpoint waits in the backup
                assert point == "between-renames"
                assert _plain_ops(src.with_name(src.name + BACKUP_SUFFIX))[-1] == "old"
            # the next run cleans up: it restores / drops the backup and removes the dead writer's temp dir
            again = load_model(str(src))
            assert again.recipe[-1]["op"] in ("old", "new")
            prepare_output(src, in_place=True, source_dir=src)
            assert _leftovers(tmp_path) == [], (point, _leftovers(tmp_path))
            assert json.loads((src / "eval.json").read_text()) == {"ppl": 1}  # --in-place keeps files it does not rewrite
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)


_RACER = textwrap.dedent("""
    import os, sys, time
    import seqtool
    from seqtool.errors import OutputExistsError
    me, other, base, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    loaded = seqtool.load("tiny-llama")
    for i in range(trials):
        open(os.path.join(base, f"ready{i}.{me}"), "w").close()
        while not os.path.exists(os.path.join(base, f"ready{i}.{other}")):
            time.sleep(0.0005)
        try:
            seqtool.save(loaded.model, loaded.tokenizer, os.path.join(base, f"out{i}"), step={"op": me})
            print(i, "ok", flush=True)
        except OutputExistsError as exc:
            print(i, "late" if "another run" in str(exc) else "early", flush=True)
""")


def test_two_writers_one_output_exactly_one_wins(tmp_path):
    trials = 8
    procs = {me: subprocess.Popen([sys.executable, "-c", _RACER, me, other, str(tmp_path), str(trials)],
                                  stdout=subprocess.PIPE, text=True, env=ENV)
             for me, other in (("a", "b"), ("b", "a"))}
    outcomes = {me: dict(line.split() for line in p.communicate(timeout=600)[0].splitlines())
                for me, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values())
    late = 0
    for i in map(str, range(trials)):
        results = sorted([outcomes["a"][i], outcomes["b"][i]])
        assert results.count("ok") == 1, (i, results)
        winner = "a" if outcomes["a"][i] == "ok" else "b"
        assert _plain_ops(tmp_path / f"out{i}")[-1] == winner  # the winner's checkpoint, not replaced
        late += "late" in results
    assert late >= 1  # the race reached the final rename at least once (both passed the up-front check)
    assert _leftovers(tmp_path) == []


def test_publish_never_replaces_an_output_that_appeared(tmp_path):
    out = tmp_path / "out"
    first, second = tmp_path / "t1", tmp_path / "t2"
    for t, tag in ((first, "one"), (second, "two")):
        t.mkdir()
        (t / "tag").write_text(tag)
    _publish(first, out, replace=False)
    with pytest.raises(OutputExistsError, match="another run"):
        _publish(second, out, replace=False)
    assert (out / "tag").read_text() == "one" and (second / "tag").read_text() == "two"
    _publish(second, out, replace=True)
    assert (out / "tag").read_text() == "two" and _leftovers(tmp_path) == []


def test_stale_temp_dirs_are_removed_and_reported(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{TMP_PREFIX}out-p{dead.pid}-deadbeef"
    live = tmp_path / f"{TMP_PREFIX}out-p{os.getpid()}-cafecafe"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    loaded = load_model("tiny-llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    assert not stale.exists() and live.exists()
    assert "removed stale temporary directory" in capsys.readouterr().err


def test_outputs_keep_the_input_dtype_and_the_umask(tmp_path):
    from safetensors import safe_open

    from seqtool.convert import convert

    loaded = load_model("tiny-llama", dtype="bf16")
    src = save_model(loaded.model, loaded.tokenizer, tmp_path / "src")
    old_mask = os.umask(0o027)
    try:
        out = Path(convert(str(src), "gqa", kv_heads=2, output=tmp_path / "gqa").output)  # computed in fp32 on CPU
    finally:
        os.umask(old_mask)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (out / "model.safetensors").stat().st_size < 1.2 * (src / "model.safetensors").stat().st_size
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    explicit = Path(convert(str(src), "gqa", kv_heads=2, output=tmp_path / "gqa32", dtype="fp32").output)
    assert json.loads((explicit / "config.json").read_text())["dtype"] == "float32"


def test_in_place_keeps_files_it_does_not_rewrite(tmp_path, capsys):
    loaded = load_model("tiny-llama")
    src = save_model(loaded.model, loaded.tokenizer, tmp_path / "src", step={"op": "a"})
    (src / "eval.json").write_text("{}")
    (src / "notes").mkdir()
    (src / "notes" / "n.txt").write_text("x")
    again = load_model(str(src))
    save_model(again.model, again.tokenizer, src, step={"op": "b"}, in_place=True, source_dir=src)
    assert (src / "eval.json").read_text() == "{}" and (src / "notes" / "n.txt").read_text() == "x"
    assert [s["op"] for s in load_model(str(src)).recipe] == ["a", "b"]
    assert "kept from the input" in capsys.readouterr().err


def test_legacy_rotary_buffers_are_not_unexpected(tmp_path):
    from safetensors.torch import load_file, save_file

    loaded = load_model("tiny-llama")
    src = save_model(loaded.model, loaded.tokenizer, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    load_model(str(src))  # older checkpoints carry these; transformers drops them on load
