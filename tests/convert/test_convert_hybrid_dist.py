"""`convert --to hybrid` under torchrun (2 processes, gloo on CPU, FSDP2 like `finetune`): both distillation
stages compute the same loss curves as one process with the same global batch, and rank 0's saved hybrid equals
the one-process hybrid (fp32, bf16 off: the runs sum the same terms in a different order, so they agree to
rounding, not bit for bit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import seqtool

OPTS = dict(mixer="mamba2", attention_layers=[1], steps1=2, steps2=2, lora_r=2, train_seq_len=32, batch=4,
            eval_rows=4, mix_retrieval=0.0, long_seq_len=32, bf16="off", progress="off", device="cpu")
SCRIPT = """
import json, sys, seqtool
opts = json.loads(sys.argv[1])
seqtool.convert("tiny-llama", "hybrid", data=sys.argv[2], run_dir=sys.argv[3], output=sys.argv[4], **opts)
"""


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in run_dir.read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    from seqtool.convert.calib import builtin_text

    data = tmp_path / "text.txt"
    data.write_text(builtin_text(20_000))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    script = tmp_path / "convert.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(script), json.dumps(OPTS), str(data), str(tmp_path / "run2"), str(tmp_path / "out2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seqtool.convert("tiny-llama", "hybrid", data=str(data), run_dir=str(tmp_path / "run1"),
                    output=tmp_path / "out1", **OPTS)
    for stage in ("stage1", "stage2"):
        one, two = _losses(tmp_path / "run1" / stage / "log.jsonl"), _losses(tmp_path / "run2" / stage / "log.jsonl")
        assert len(two) == 2
        torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    a, b = load_file(tmp_path / "out1" / "model.safetensors"), load_file(tmp_path / "out2" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
