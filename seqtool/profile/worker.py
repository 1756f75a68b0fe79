"""Measurement subprocess: ``python -m seqtool.profile.worker RESULT.json`` with a JSON spec on stdin.

Loads the model fresh, measures one length (:func:`seqtool.profile.measure.measure_length`) and writes
``{"row": {...}}``, ``{"oom": "..."}`` or ``{"error": {"type": ..., "message": ...}}`` to RESULT.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    spec = json.loads(sys.stdin.read())
    import torch

    from seqtool.arch.io import load_model
    from seqtool.errors import SeqtoolError
    from seqtool.profile.measure import measure_length
    from seqtool.profile.memory import is_oom_error

    torch.set_num_threads(int(spec["threads"]))
    try:
        model = load_model(spec["source"], dtype=spec["dtype"], device=spec["device"], attn=spec["attn"]).model
        row = measure_length(model, seq_len=spec["seq_len"], batch=spec["batch"],
                             decode_tokens=spec["decode_tokens"], warmup=spec["warmup"], repeats=spec["repeats"],
                             breakdown=spec["breakdown"])
        result = {"row": row}
    except SeqtoolError as exc:
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        result = {"oom": str(exc).splitlines()[0][:200]}
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
