"""The shared test matrix: every registered patch method with the options the matrix runs it at.

Small blocks/pages so that ~100-200-token inputs have many blocks. A method added to the registry must get an
entry here (``test_every_method_is_in_the_matrix`` fails otherwise).

``decode_reference``: how prefill + cached decode is checked —
  ``"recorded"``: against a dense forward masked with the selections recorded at every step (no eviction);
  ``"forward"``: against the patched model's full forward (methods whose decode selection equals it, e.g. an
  evicting cache whose coordinates differ from the original positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodCase:
    name: str
    options: dict = field(default_factory=dict)  # method options besides budget / min_len
    decode_reference: str = "recorded"
    sparse_prefill: bool = True  # False: prefill is dense by design (decode-only methods)
    sparse_decode: bool = True  # False: decode attends every key by design (prefill-only methods)


CASES = [
    MethodCase("dense", sparse_prefill=False, sparse_decode=False),
    MethodCase("streaming", dict(block=16, sink_blocks=1), decode_reference="forward"),
    MethodCase("block_topk", dict(block=16, page=8)),
    MethodCase("vertical_slash", dict(block=16, last_q=16), sparse_decode=False),
    MethodCase("recycled", dict(stride=3, sim=-1.0), sparse_prefill=False),
    MethodCase("hip", dict(block_size=16)),
    MethodCase("infllm", dict(block_size=16)),
    MethodCase("razor", dict(block=16, heads=("0.0",), compensate=False)),
    MethodCase("longheads", dict(block_size=16)),
    MethodCase("act", dict(heads=(), block=16), sparse_prefill=False, sparse_decode=False),
    MethodCase("snapkv", dict(window=8), sparse_prefill=False),
    MethodCase("h2o", dict(sinks=2), sparse_prefill=False),
    MethodCase("expected_attention", dict(future=32), sparse_prefill=False),
]
BY_NAME = {c.name: c for c in CASES}
