"""HiP's official selection (DeepAuto-AI/hip-attention, ``src/hip_attn/v1_0``) run on CPU, as a keep mask.

The official v1.0 HiP (the paper's hierarchical top-k mask estimation) is Triton only. This module imports it from
a checkout given at run time (``load(path)``: ``path`` = the checkout root, holding ``src/hip_attn``) and runs it
under ``TRITON_INTERPRET=1`` with thin shims; nothing of the official code is copied here:

* ``hip_attn/__init__.py`` (which imports the model wrappers and their CUDA-only deps) is not executed: a bare
  package object points at ``src/hip_attn`` so ``hip_attn.v1_0.attention1_block_gpu`` imports alone;
* ``numba`` (used only by the unused ``to_dense`` debug helper) is a stub; ``torch.cuda.current_device`` /
  ``set_device`` (called around every kernel launch) are no-ops;
* the masking kernel's ``tl_device_round`` (CUDA libdevice ``round``; ``tl.math.round`` is absent in triton 3.9 and
  the interpreter does not patch libdevice) becomes round-half-away-from-zero from ``tl.floor``;
* the interpreter refuses two things compiled Triton accepts: int64 / float32 0-1 masks in ``tl.load`` /
  ``tl.store`` (cast to bool; every value seen is 0 or 1) and ``[:, None]`` on a rank-0 tensor (a python ``True``
  mask promoted to a scalar; treated as a size-1 dim, which is how it broadcasts when compiled); and, for speed
  only, the interpreter patches ``triton.language`` once per kernel launch instead of on every device-function call.

:func:`official_select` calls the official ``hip_attention`` (``v1_0/attention1_block_gpu.py``: its own parameter
heuristics, then ``hip_attention_mask`` → ``masking_iteration`` (the tree) → ``safe_indices``, then the sparse
attention kernel ``calc_prob_return_context``) and returns the ``(indices, ks)`` it reports; :func:`keep_mask` turns
them into the set of keys that kernel attends (read from ``calc_prob_return_context``: the first
``num_sink * block_size_k`` tokens, the chosen ``block_size_k``-token blocks at or after them, and the
``sliding_window_size`` keys ending at the query block's end, all causal).
"""
from __future__ import annotations

import math
import os
import sys
import types

import numpy as np
import torch

_MOD = None


def load(path: str):
    """Import ``hip_attn.v1_0.attention1_block_gpu`` from the checkout at ``path`` under the Triton interpreter."""
    global _MOD
    if _MOD is not None:
        return _MOD
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before starting Python (triton reads it at import)")
    src = os.path.join(path, "src")
    if not os.path.isdir(os.path.join(src, "hip_attn", "v1_0")):
        raise FileNotFoundError(f"{path}: no src/hip_attn/v1_0 (a hip-attention checkout root expected)")
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as ti

    numba = types.ModuleType("numba")
    numba.njit = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    numba.prange = range
    sys.modules.setdefault("numba", numba)
    pkg = types.ModuleType("hip_attn")
    pkg.__path__ = [os.path.join(src, "hip_attn")]
    sys.modules["hip_attn"] = pkg
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda d: None

    builder = ti.InterpreterBuilder
    load0, store0 = builder.create_masked_load, builder.create_masked_store

    def _bool(mask):
        return mask if mask.data.dtype == np.bool_ else ti.TensorHandle(mask.data.astype(bool), tl.int1)

    builder.create_masked_load = lambda self, p, m, o, *a: load0(self, p, _bool(m), o, *a)
    builder.create_masked_store = lambda self, p, v, m, *a: store0(self, p, v, _bool(m), *a)
    getitem0 = tl.core.tensor.__getitem__

    @tl.core.builtin
    def getitem(self, slices, _semantic=None):
        if len(self.shape) == 0:
            sl = slices.values if isinstance(slices, tl.core.tuple) else (
                slices if isinstance(slices, tuple) else (slices,))
            slices = tuple(None for _ in sl)
        return getitem0(self, slices, _semantic=_semantic)

    tl.core.tensor.__getitem__ = getitem

    # speed only: the interpreter re-patches triton.language on every device-function call (most of the run time);
    # patch once per kernel launch instead (the patches are global setattrs, restored when the launch ends)
    patch0, active = ti._patch_lang, []

    class _Scope:
        def __init__(self, inner):
            self.inner = inner

        def restore(self):
            self.inner.restore()
            active.clear()

    def patch_lang(fn):
        if active:
            return ti._LangPatchScope()
        active.append(1)
        return _Scope(patch0(types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})))

    ti._patch_lang = patch_lang

    from hip_attn.v1_0.attention1_block_gpu_kernel import masking_iteration as mi

    @triton.jit
    def _round(x):
        return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(-x + 0.5))

    mi.tl_device_round = _round
    globals()["tl"] = tl  # the jit'd shim resolves ``tl`` in this module's globals
    from hip_attn.v1_0 import attention1_block_gpu as A

    _MOD = A
    return A


#: the official ``hip_attention`` defaults this comparison keeps (v1_0/attention1_block_gpu.py)
DEFAULTS = dict(scale_up=2, block_size_q=32, block_size_k=2, reduce_method="max", reduce_stride=2,
                sliding_window_size=128, num_sink=None)


def official_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_k: int, *, sampling_method="first",
                    enable_sparq=False, dense_queries_exp=0, **over):
    """Official ``hip_attention`` on one layer. ``q`` ``(Hq, Tq, D)`` post-RoPE, already × 1/sqrt(D) (as the
    official ``custom_attention`` passes it); ``k``/``v`` ``(Hkv, Tk, D)``. Returns ``(indices (Hq, nbq, K) int,
    ks (Hq, nbq), params)`` or ``None`` when the official code ran the call densely (its prompt rule)."""
    A = _MOD
    p = {**DEFAULTS, **over}
    # Only the selection is wanted: the attention kernels (calc_prob_return_context, and flash_attn for the
    # queries the official prompt rule runs densely) return zeros; keep_mask rebuilds the set the kernel attends.
    dense_calls = []
    A.calc_prob_return_context = lambda queries, **kw: torch.zeros_like(queries)
    A.flash_attention = lambda q_, k_, v_, is_causal=True, backend=None: (dense_calls.append(q_.shape) or
                                                                          torch.zeros_like(q_), None)
    _, probe = A.hip_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), mask_k=mask_k, scale_up=p["scale_up"], is_causal=True,
        block_size_q=p["block_size_q"], block_size_k=p["block_size_k"], reduce_method=p["reduce_method"],
        reduce_stride=p["reduce_stride"], enable_sparq=enable_sparq, sampling_method=sampling_method,
        using_sliding_window=True, sliding_window_size=p["sliding_window_size"], dense_queries_exp=dense_queries_exp,
        num_sink=p["num_sink"])
    if probe is None:
        if dense_calls and dense_calls[0][1] == q.shape[1]:
            return None
        raise NotImplementedError("prompt split into dense + sparse queries: not handled by this comparison")
    indices, ks, _ = probe
    tq, tk = q.shape[1], k.shape[1]
    bq = min(p["block_size_q"], 1 << (tq - 1).bit_length())  # the clamp hip_attention applies
    bk = min(p["block_size_k"], 1 << (tk - 1).bit_length())
    return indices, ks, {**p, "block_size_q": bq, "block_size_k": bk,
                         "sinks": (p["num_sink"] or math.ceil(32 / bk)) * bk}


def keep_mask(indices: torch.Tensor, ks: torch.Tensor, tq: int, tk: int, params: dict) -> torch.Tensor:
    """bool ``(Hq, Tq, Tk)``: the keys ``calc_prob_return_context`` attends for each query (causal)."""
    h, nb, kmax = indices.shape
    bq, bk, window, sinks = params["block_size_q"], params["block_size_k"], params["sliding_window_size"], \
        params["sinks"]
    ks = ks.long()
    # ks is left unwritten (torch.empty) for query blocks whose causal width never grows past the tree's start
    # width (the first ~mask_k tokens); their start mask covers every key, so they keep all causal keys.
    unset = (ks < 0) | (ks > kmax)
    slot = torch.arange(kmax)[None, None]
    tok = indices.long()[..., None] + torch.arange(bk)  # (h, nb, K, bk)
    ok = (slot < ks[..., None])[..., None] & (tok < tk) & (tok >= sinks)
    blk = torch.zeros(h, nb, tk + 1, dtype=torch.bool)
    blk.scatter_(2, torch.where(ok, tok, tk).reshape(h, nb, -1), True)
    blk = blk[..., :tk]
    pos = torch.arange(tk)
    end = torch.clamp((torch.arange(nb) + 1) * bq + tk - tq, max=tk)  # tsrc of each query block
    start = torch.clamp(end - window, min=0)
    win = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])  # (nb, tk)
    blk = blk | win[None] | (pos < sinks)[None, None] | unset[..., None]
    per_q = blk.repeat_interleave(bq, 1)[:, :tq]  # (h, tq, tk)
    qpos = torch.arange(tk - tq, tk)[:, None]
    return per_q & (pos[None, :] <= qpos)[None]
