"""Two processes (torchrun, gloo on CPU, FSDP2) compute the same loss curve as one process with the same global
batch, and rank 0's saved checkpoint equals the one-process checkpoint.

Tolerance: losses within 1e-5 relative, weights within 1e-5 absolute (fp32: the two runs sum the same terms in a
different order — per-rank sums, then an all-reduce — so they agree to rounding, not bit for bit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import seqtool

ARGS = ["--steps", "3", "--seq-len", "32", "--batch", "4", "--grad-accum", "2", "--method", "full", "--train",
        "attention,mlp,norm", "--lr", "5e-3", "--warmup", "1"]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["fsdp"])
def test_two_processes_match_one(tmp_path, domain_file, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "seqtool", "--quiet", "finetune", "tiny-llama", "--data", str(domain_file), *ARGS, "--dist", mode,
           "--device", "cpu", "--run-dir", str(tmp_path / "run2"), "-o", str(tmp_path / "out2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    opts = dict(zip(ARGS[::2], ARGS[1::2]))
    one = seqtool.finetune("tiny-llama", data=str(domain_file), steps=3, seq_len=32, batch=4, grad_accum=2,
                           method="full", train="attention,mlp,norm", lr=float(opts["--lr"]), warmup=1,
                           device="cpu", progress="off", run_dir=tmp_path / "run1", output=tmp_path / "out1")
    two_losses = _losses(tmp_path / "run2")
    assert len(two_losses) == 3
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(_losses(tmp_path / "run1")),
                               rtol=1e-5, atol=1e-6)
    a, b = load_file(tmp_path / "out1" / "model.safetensors"), load_file(tmp_path / "out2" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["seqtool"]["steps"][-1]["processes"] == 2
    assert one.steps == 3
