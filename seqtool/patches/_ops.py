"""The kernel ops patches compute with — the only door from seqtool.patches to seqtool.kernels.

Imported lazily so that importing seqtool (or a method module) never loads kernel code. Never add a second
implementation here: every sparse compute goes through these ops.
"""
from __future__ import annotations


def block_sparse_attn(*args, **kwargs):
    from seqtool.kernels import block_sparse_attn as op

    return op(*args, **kwargs)


def decode_attn(*args, **kwargs):
    from seqtool.kernels import decode_attn as op

    return op(*args, **kwargs)


def merge_attn_states(*args, **kwargs):
    from seqtool.kernels import merge_attn_states as op

    return op(*args, **kwargs)


def vertical_slash_index(*args, **kwargs):
    from seqtool.kernels import vertical_slash_index as op

    return op(*args, **kwargs)
