"""Training-free attention patches: sparse / streaming / recycled attention as transformers attention functions.

Nothing is patched on import. Typical use::

    handle = seqtool.patches.apply_patch(model, "block_topk", budget=0.25, min_len=0)
    out = model.generate(ids, cache=seqtool.patches.make_cache(model), max_new_tokens=32)
    handle.remove()                       # the model is exactly as before

See ``seqtool/patches/README.md`` for how to add a method.
"""
from __future__ import annotations

from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.budget import Budget
from seqtool.patches.registry import get_method, list_methods, register_method
from seqtool.patches.runtime import (
    ATTN_NAME,
    PatchHandle,
    Policy,
    apply_attn_spec,
    apply_patch,
    get_handle,
    make_cache,
    reapply_from_recipe,
)
from seqtool.patches.spec import format_attn_spec, parse_attn_spec

__all__ = [
    "ATTN_NAME", "AttentionMethod", "AttnCall", "Budget", "PatchHandle", "Policy", "apply_attn_spec", "apply_patch",
    "format_attn_spec", "get_handle", "get_method", "list_methods", "make_cache", "parse_attn_spec",
    "reapply_from_recipe", "register_method",
]
