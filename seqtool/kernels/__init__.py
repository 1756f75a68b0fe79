"""Attention kernel ops: Triton on CUDA, vectorised PyTorch on CPU, and a plain reference for each.

Layout (B, H, T, D); k/v may have fewer heads than q (GQA, Hq % Hkv == 0, never repeated in memory).
Queries are aligned to the END of the keys: query i sits at key position Tk - Tq + i. ``kv_start`` (B,) int
marks left padding (keys before it are ignored). Rows that see no key return out 0 and lse -inf.
Every op takes ``backend=`` "auto" (triton on CUDA when installed, torch otherwise), "triton" (CUDA, or CPU
tensors under TRITON_INTERPRET=1), "torch" or "reference". Importing this package never imports triton.

Signatures (all arguments after ``*`` are keyword-only)::

    block_sparse_attn(q, k, v, block_index, block_count, *, block_q=64, block_k=64, scale=None,
                      kv_start=None, return_lse=False, column_index=None, column_count=None,
                      backend="auto") -> out | (out, lse)
        block_index (B, Hq, ceil(Tq/block_q), max_k_blocks) int key-block ids (unique per row, any order),
        block_count (B, Hq, n_qblocks) int; column_index (B, Hq, n_qblocks, max_cols) absolute key positions
        outside the listed blocks, column_count (B, Hq, n_qblocks). Causal inside blocks. Forward only.
        Triton needs block_q/block_k powers of two >= 16.

    vertical_slash_attn(q, k, v, vertical_index, slash_index, *, vertical_count=None, slash_count=None,
                        block_q=64, block_k=64, scale=None, kv_start=None, return_lse=False,
                        backend="auto") -> out | (out, lse)
        vertical_index (B, Hq, NV) absolute key columns; slash_index (B, Hq, NS) diagonal offsets o >= 0
        (query at p sees key p - o). As in MInference, slashes cover whole key blocks and verticals are
        exact columns: vertical_slash_index() converts the pattern to block_sparse_attn's block + column
        lists (that conversion is also how the CPU path handles it).

    vertical_slash_index(vertical_index, slash_index, Tq, Tk, *, block_q=64, block_k=64,
                         vertical_count=None, slash_count=None)
        -> (block_index, block_count, column_index, column_count)

    decode_attn(q, k, v, *, page_index=None, page_count=None, page_size=64, scale=None, kv_start=None,
                kv_len=None, return_lse=False, backend="auto") -> out | (out, lse)
        1-16 queries; kv_len (B,) valid keys (queries end there); page_index (B, Hkv, max_pages) int pages
        shared by a KV group's query heads (Quest / top-k pages), page_count (B, Hkv). Split-KV on CUDA.

    linear_attn(q, k, v, *, decay=None, chunk_size=64, initial_state=None, output_final_state=False,
                scale=1.0, backend="auto") -> out | (out, final_state)
        o_t = scale * q_t S_t, S_t = decay_h * S_{t-1} + k_t^T v_t; decay (Hq,) in (0, 1];
        k (B, Hkv, T, Dk), v (B, Hkv, T, Dv); states (B, Hq, Dk, Dv) fp32. Differentiable.

    linear_attn_step(q, k, v, state, *, decay=None, scale=1.0) -> (out, new_state)
        recurrent decode form (any T, usually 1), equal to linear_attn with initial_state=state.

    gated_linear_attn(q, k, v, log_decay, *, chunk=64, initial_state=None, return_state=False, scale=1.0,
                      backend="auto") -> out | (out, final_state)
        S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t; log_decay g <= 0 (B, H, T) per token
        and head (Mamba2 / Lightning) or (B, H, T, Dk) per key dim (GLA). q, k (B, H, T, Dk), v (B, H, T, Dv);
        states (B, H, Dk, Dv) fp32. Differentiable in every input.
    gated_linear_attn_step(q, k, v, log_decay, state, *, scale=1.0) -> (out, new_state)

    delta_rule_attn(q, k, v, beta, *, log_decay=None, chunk=64, initial_state=None, return_state=False,
                    scale=1.0, backend="auto") -> out | (out, final_state)
        (Gated) DeltaNet: S_t = a_t S_{t-1} + beta_t k_t^T (v_t - a_t k_t S_{t-1}), a_t = exp(g_t);
        beta (B, H, T); log_decay (B, H, T) or None; chunked WY form on CPU. Differentiable in every input.
    delta_rule_attn_step(q, k, v, beta, state, *, log_decay=None, scale=1.0) -> (out, new_state)

    merge_attn_states(out1, lse1, out2, lse2) -> (out, lse)
        attention over the union of two disjoint key sets (e.g. sink + window + selected pages).

Shapes: out (B, Hq, Tq, D) in q.dtype; lse (B, Hq, Tq) fp32 natural log.
"""
from __future__ import annotations

from ._common import HAS_TRITON
from .block_sparse import block_sparse_attn, vertical_slash_attn, vertical_slash_index
from .decode import decode_attn
from .delta_rule import delta_rule_attn, delta_rule_attn_step
from .gated_linear import gated_linear_attn, gated_linear_attn_step
from .linear import linear_attn, linear_attn_step
from .merge import merge_attn_states

__all__ = [
    "HAS_TRITON",
    "block_sparse_attn",
    "decode_attn",
    "delta_rule_attn",
    "delta_rule_attn_step",
    "gated_linear_attn",
    "gated_linear_attn_step",
    "linear_attn",
    "linear_attn_step",
    "merge_attn_states",
    "vertical_slash_attn",
    "vertical_slash_index",
]
