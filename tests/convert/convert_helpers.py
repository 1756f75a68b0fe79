"""Helpers for conversion tests: fresh tiny models (seed 0), fixed token ids, plain-transformers reload."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from seqtool.arch.io import load_model

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"]
# Small calibration so tests stay fast; the options are the library's own.
CALIB = {"samples": 4, "seq_len": 32}


def token_ids() -> torch.Tensor:
    return torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def fresh(name: str):
    """A newly built preset (LoadedModel): conversions modify models in place."""
    return load_model(name, device="cpu", dtype="fp32")


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


_PLAIN_LOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor(job["ids"])).logits
        torch.save({"logits": out, "class": type(model).__name__, "tied": model.lm_head.weight.data_ptr()
                    == model.get_input_embeddings().weight.data_ptr()}, job["out"])
    assert not any(m == "seqtool" or m.startswith("seqtool.") for m in sys.modules), "seqtool was imported"
""")


def plain_transformers_logits(dirs: list[Path], ids: torch.Tensor, tmp_path: Path) -> list[dict]:
    """Load every checkpoint in ONE subprocess that imports transformers but never seqtool; returns its outputs."""
    jobs = [{"dir": str(d), "ids": ids.tolist(), "out": str(tmp_path / f"plain-{i}.pt")} for i, d in enumerate(dirs)]
    proc = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, json.dumps(jobs)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                                                       "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(job["out"]) for job in jobs]
