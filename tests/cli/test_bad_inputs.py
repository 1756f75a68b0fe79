"""Bad inputs across every command (issue 18): each exits 2 with exactly one ``error:`` line on stderr (no
traceback, no progress), nothing on stdout, nothing written, and the input's bytes unchanged.

Most cases run in-process (CliRunner); a few run as real subprocesses (the shell path, one-line usage errors).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from seqtool.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
BAD_CHECKPOINTS = ("missing", "unexpected", "shape", "truncated", "empty", "garbage", "badjson", "noweights")
FRAGMENTS = {
    "missing": "missing 1 tensor(s)", "unexpected": "does not use", "shape": "wrong shape",
    "truncated": "truncated", "empty": "empty (0 bytes)", "garbage": "corrupted", "badjson": "not valid JSON",
    "noweights": "no weights",
}
# One invocation per command; {ck} is the (bad) checkpoint, {out} a fresh output path.
COMMANDS = {
    "inspect": "inspect {ck}",
    "eval": "eval {ck} --task ppl --seq-len 64 --ppl-tokens 64",
    "profile": "profile {ck} --seq-len 64 --decode-tokens 1 --repeats 1 --warmup 0",
    "patch": "patch {ck} --method streaming --budget 16 -o {out}",
    "convert": "convert {ck} --to gqa --kv-heads 2 -o {out}",
    "prune": "prune {ck} --ratio 0.3 -o {out}",
}


def _edit_weights(directory: Path, change) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A good bf16 tiny-llama checkpoint and one broken copy per kind of damage."""
    import seqtool

    root = tmp_path_factory.mktemp("ckpts")
    loaded = seqtool.load("tiny-llama", dtype="bf16")
    good = seqtool.save(loaded.model, loaded.tokenizer, root / "good", step={"op": "made"})
    made = {"good": good}
    for kind in BAD_CHECKPOINTS:
        made[kind] = Path(shutil.copytree(good, root / kind))
    q = "model.layers.0.self_attn.q_proj.weight"
    _edit_weights(made["missing"], lambda t: t.pop(q))
    _edit_weights(made["unexpected"], lambda t: t.__setitem__("model.layers.0.extra.weight", t["model.norm.weight"].clone()))
    _edit_weights(made["shape"], lambda t: t.__setitem__(q, t[q][:-1].clone()))
    weights = (good / "model.safetensors").read_bytes()
    (made["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (made["empty"] / "model.safetensors").write_bytes(b"")
    (made["garbage"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + weights[24:600])
    (made["badjson"] / "config.json").write_text('{"model_type": "llama",')
    (made["noweights"] / "model.safetensors").unlink()
    return made


def _tree(path: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file (and '<dir>' for directories) under ``path``, hidden ones included."""
    if not path.exists():
        return {}
    found = {}
    for entry in sorted(path.rglob("*")):
        rel = str(entry.relative_to(path))
        found[rel] = "<dir>" if entry.is_dir() else hashlib.sha1(entry.read_bytes()).hexdigest()
    return found


def _case_list() -> list[tuple[str, str, str]]:
    """(id, command template, expected fragment of the error line)."""
    cases = [(f"{cmd}-{kind}", tpl.replace("{ck}", "{ck:" + kind + "}"), FRAGMENTS[kind])
             for kind in BAD_CHECKPOINTS for cmd, tpl in COMMANDS.items()]
    cases += [
        # output paths that would destroy something, --force or not
        ("out-empty", "prune tiny-llama --ratio 0.3 -o '' --force", "output path is empty"),
        ("out-dot", "prune tiny-llama --ratio 0.3 -o . --force", "current directory"),
        ("out-parent-of-cwd", "prune tiny-llama --ratio 0.3 -o .. --force", "current directory"),
        ("out-home", "prune tiny-llama --ratio 0.3 -o {home} --force", "home directory"),
        ("out-root", "convert tiny-llama --to gqa --kv-heads 2 -o / --force", "filesystem root"),
        ("out-inside-input", "prune {ck:good} --ratio 0.3 -o {ck:good}/sub --force", "inside the input"),
        ("out-contains-input", "convert {ck:good} --to gqa --kv-heads 2 -o {ckroot} --force", "contains the input"),
        ("out-unwritable", "prune tiny-llama --ratio 0.3 -o {readonly}/out", "not writable"),
        ("out-exists", "prune {ck:good} --ratio 0.3 -o {existing}", "exists; pass --force"),
        ("out-is-input", "patch {ck:good} --method streaming --budget 16 -o {ck:good} --force", "is the input"),
        ("finetune-out-dot", "finetune tiny-llama --steps 1 -o . --force", "current directory"),
        ("finetune-out-exists", "finetune tiny-llama --steps 1 -o {existing}", "exists; pass --force"),
        ("finetune-bad-teacher", "finetune tiny-llama --steps 1 --teacher {ck:truncated} -o {out}", "truncated"),
        ("in-place-preset-prune", "prune tiny-llama --ratio 0.3 --in-place", "built-in preset"),
        ("in-place-preset-convert", "convert tiny-llama --to gqa --kv-heads 2 --in-place", "built-in preset"),
        ("in-place-preset-patch", "patch tiny-llama --method streaming --budget 16 --in-place", "built-in preset"),
        ("in-place-ref", "prune ref --ratio 0.3 --in-place", "built-in preset"),
        # arguments, checked in the order the command line reads
        ("ratio-not-a-number", "prune tiny-llama --ratio abc -o {out}", "Invalid value for '--ratio'"),
        ("ratio-missing", "prune tiny-llama -o {out}", "Missing option '--ratio'"),
        ("ratio-zero", "prune tiny-llama --ratio 0 -o {out}", "removes nothing"),
        ("ratio-too-big", "prune tiny-llama --ratio 1.5 -o {out}", "(0, 1)"),
        ("recover-unknown", "prune tiny-llama --ratio 0.3 --recover bogus -o {out}", "unknown --recover"),
        ("convert-model-first", "convert nope-model --to hybrid", "nope-model"),
        ("convert-to-unknown", "convert tiny-llama --to hybridd", "unknown conversion 'hybridd'"),
        ("convert-needs-kv-heads", "convert tiny-llama --to gqa", "needs --kv-heads"),
        ("convert-to-prune", "convert ref --to prune -o {out}", "seqtool prune"),
        ("convert-no-output", "convert tiny-llama --to gqa --kv-heads 2", "pass -o OUT"),
        ("mistyped-path", "inspect fx/nope", "no such directory 'fx/nope'"),
        ("unknown-name", "inspect tiny-gpt", "presets:"),
        ("eval-compare-missing", "eval tiny-llama --task ppl --compare fx/nope", "no such directory"),
        ("profile-compare-missing", "profile tiny-llama --compare fx/nope", "no such directory"),
        ("eval-bad-seq-len", "eval tiny-llama --seq-len abc", "malformed length"),
        ("eval-bad-depths", "eval tiny-llama --task passkey --depths x", "malformed --depths"),
        ("profile-max-seconds", "profile tiny-llama --seq-len 64 --max-seconds 0", "--max-seconds"),
        ("profile-both-lengths", "profile tiny-llama --seq-len 64 --sweep 64,128", "not both"),
        ("patch-no-output", "patch tiny-llama --method streaming --budget 16", "pass -o OUT"),
        ("unknown-flag", "inspect tiny-llama --bogus", "No such option"),
        ("unknown-command", "bogus tiny-llama", "No such command"),
    ]
    return cases


CASES = _case_list()


def _expand(template: str, checkpoints: dict[str, Path], work: Path, readonly: Path) -> list[str]:
    import shlex

    text = template
    for name, path in checkpoints.items():
        text = text.replace("{ck:" + name + "}", str(path))
    text = (text.replace("{ckroot}", str(checkpoints["good"].parent)).replace("{out}", str(work / "out"))
            .replace("{existing}", str(work / "existing")).replace("{home}", str(Path.home()))
            .replace("{readonly}", str(readonly)))
    return shlex.split(text)


@pytest.fixture
def readonly(tmp_path) -> Path:
    """A directory this process cannot create entries in (root ignores permission bits: use /sys then)."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    path = tmp_path / "readonly"
    path.mkdir()
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


def test_there_are_enough_cases():
    assert len(CASES) >= 40
    assert {c[1].split()[0] for c in CASES} >= set(COMMANDS)


@pytest.mark.parametrize("case_id, template, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, template, fragment, checkpoints, tmp_path, monkeypatch, readonly):
    work = tmp_path / "work" / "cwd"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    (work / "existing").mkdir()
    monkeypatch.chdir(work)
    args = _expand(template, checkpoints, work, readonly)
    watched = [tmp_path / "work", checkpoints["good"].parent]
    before = [_tree(p) for p in watched]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    assert [_tree(p) for p in watched] == before  # nothing written, inputs unchanged


@pytest.mark.parametrize("args, fragment", [
    (["prune", "tiny-llama", "--ratio", "0.3", "-o", "", "--force"], "output path is empty"),
    (["prune", "tiny-llama", "--ratio", "abc"], "Invalid value for '--ratio'"),
    (["inspect", "{truncated}"], "truncated"),
])
def test_bad_input_subprocess(args, fragment, checkpoints, tmp_path):
    """The real entry point: a one-line error and exit 2, cwd untouched (the `-o ""` data-loss case)."""
    (tmp_path / "keep.txt").write_text("mine")
    args = [a.replace("{truncated}", str(checkpoints["truncated"])) for a in args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "seqtool", *args], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
