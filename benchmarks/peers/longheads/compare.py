"""LongHeads: the official code's chunk selection vs seqtool's ``longheads`` on the same inputs (issue 17).

The official implementation (github LuLuLuyi/LongHeads, ``modeling_longheads/modeling_llama.py``) has no selection
function: chunk keys, per-head chunk scoring, top-k and the re-encoded attention all live inline in
``LlamaAttention.forward``. This script runs that forward *unchanged*, imported from the checkout given with
``--official``, one layer at a time on a capture's RoPE-free ``q``/``k``/``v``:

* the module's ``q_proj``/``k_proj``/``v_proj`` are replaced by slices of a "hidden state" that is the
  concatenation ``[q_pre | k_pre | v]`` (so its projections return exactly the captured tensors; zero padding
  stays zero as with bias-free Linear layers) and ``o_proj`` by the identity (per-head outputs come back);
* ``flash_attn`` (CUDA only) is replaced by a pure-torch shim of the four names the module imports
  (``flash_attn_qkvpacked_func``, ``flash_attn_func``, ``flash_attn_with_kvcache`` incl. ``cache_seqlens``,
  ``FlashSelfAttention``): plain softmax attention with flash's semantics;
* the selection is *observed*, not recomputed: a ``TorchFunctionMode`` records the integer ``torch.sort`` results
  of the forward (``sorted_atten_chunks``: per query and head the chunk ids the official code gathers), and the
  keep mask is built from them exactly as the forward slices keys (prefill: the packed chunks truncated to
  ``relative_position``, which drops the query's own key; decode: first chunk + chosen + last full chunk +
  the open chunk's keys). A check re-attends with that mask at the official packed positions and compares with
  the official output (``max |Δ|`` in the results).

Budget matching at 2048 tokens (``window_size`` = seqtool's ``block_size`` = 64): budget ``b`` → ``atten_length``
= ``b * 2048`` (0.5 → 1024 = 16 chunks, 0.25 → 512 = 8 chunks; a multiple of 256 as the official code asserts);
``begin_selective_length`` = ``atten_length`` (the earliest query that has more than ``atten_length`` keys; the
official default sets both to the trained length 4096). The official prefill keeps ``atten_length // 64`` chunks
(first + previous + own + the rest by score) for every query from ``begin_selective_length`` on; its decode keeps
first + ``n - 3`` scored + the last full chunk + the open chunk's keys. seqtool: ``longheads:budget=b,min_len=0,
trained_len=2048`` (the quality table's spec), first + 2 local chunks + the budget rounded up to chunks.

    python benchmarks/peers/longheads/compare.py --official /tmp/longheads-official --deps /tmp/longheads-deps \\
        --caps /tmp/caps/passkey-2048-d0.25-s0.pt /tmp/caps/passkey-2048-d0.5-s0.pt /tmp/caps/passkey-2048-d0.75-s0.pt \\
        --samples 5 --out benchmarks/results/peers_longheads

``--deps``: a folder with ``einops`` (the official module imports it; ``pip install --target DIR einops``).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/peers: selection_harness
import selection_harness as H  # noqa: E402

WINDOW = 64
TAIL = 16


# ---- official module, imported under a CPU shim --------------------------------------------------------------------
def _attn(q, k, v, scale=None, causal=False, lengths=None):
    """flash-attn semantics on ``(B, S, H, D)`` tensors: causal aligned bottom-right, keys past ``lengths[b]``
    ignored."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (x.transpose(1, 2).float() for x in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) * scale
    sq, sk = s.shape[-2], s.shape[-1]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(sk)[None, :] <= torch.arange(sk - sq, sk)[:, None]
    allowed = allowed[None, None].expand(s.shape[0], 1, sq, sk)
    if lengths is not None:
        allowed = allowed & (torch.arange(sk)[None, None, None, :] < lengths.long()[:, None, None, None])
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ vf).transpose(1, 2).to(q.dtype)


def _flash_shim() -> None:
    def qkvpacked(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        return _attn(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale, causal)

    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        return _attn(q, k, v, softmax_scale, causal)

    def with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                     cache_batch_idx=None, softmax_scale=None, causal=False, **_):
        assert k is None and v is None and rotary_cos is None and cache_batch_idx is None
        lengths = None
        if cache_seqlens is not None:
            lengths = torch.as_tensor(cache_seqlens).reshape(-1).expand(q.shape[0])
        return _attn(q, k_cache, v_cache, softmax_scale, causal, lengths)

    class FlashSelfAttention(nn.Module):
        def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0, **_):
            super().__init__()
            self.causal, self.softmax_scale = causal, softmax_scale

        def forward(self, qkv, causal=None, **_):
            return qkvpacked(qkv, softmax_scale=self.softmax_scale, causal=self.causal if causal is None else causal)

    fa = types.ModuleType("flash_attn")
    fa.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fa.flash_attn_qkvpacked_func, fa.flash_attn_func, fa.flash_attn_with_kvcache = qkvpacked, func, with_kvcache
    mods = types.ModuleType("flash_attn.modules")
    mha = types.ModuleType("flash_attn.modules.mha")
    mha.FlashSelfAttention = FlashSelfAttention
    sys.modules.update({"flash_attn": fa, "flash_attn.modules": mods, "flash_attn.modules.mha": mha})


def load_official(path: Path):
    """Import ``modeling_longheads.modeling_llama`` from the checkout (transformers is imported first, so its
    optional-package probes never see the shim)."""
    import transformers  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    _flash_shim()
    sys.path.insert(0, str(path))
    import modeling_longheads.configuration_llama as cfg
    import modeling_longheads.modeling_llama as mod

    return cfg, mod


class _Slice(nn.Module):
    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return x[..., self.lo:self.hi]


class _SortRecorder(TorchFunctionMode):
    """Records the integer ``torch.sort`` values of the official forward (its ``sorted_atten_chunks``)."""

    def __init__(self):
        super().__init__()
        self.values: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.sort and not args[0].is_floating_point():
            self.values.append(out[0].clone())
        return out


class OfficialLayer:
    """One official ``LlamaAttention`` fed captured pre-RoPE tensors; keeps the official cache between calls."""

    def __init__(self, official, n_heads: int, head_dim: int, atten_length: int, inv_freq: torch.Tensor):
        cfg, mod = official
        config = cfg.LlamaConfig(hidden_size=n_heads * head_dim, num_attention_heads=n_heads,
                                 max_position_embeddings=8192, window_size=WINDOW, atten_length=atten_length,
                                 begin_selective_length=atten_length, cpu_offload=False, batch_encoding=False)
        self.attn = mod.LlamaAttention(config).eval()
        hd = n_heads * head_dim
        self.attn.q_proj, self.attn.k_proj, self.attn.v_proj = _Slice(0, hd), _Slice(hd, 2 * hd), _Slice(2 * hd, 3 * hd)
        self.attn.o_proj = nn.Identity()
        assert torch.allclose(self.attn.rotary_emb.inv_freq.float(), inv_freq.float()), "RoPE base differs"
        self.n, self.h, self.d, self.length = atten_length // WINDOW, n_heads, head_dim, atten_length
        self.past = None

    def __call__(self, q_pre, k_pre, v, start: int):
        """``q_pre``/``k_pre``/``v`` ``(H, Tq, D)`` for positions ``[start, start + Tq)``; prefill when ``Tq > 1``.
        Returns the official output ``(H, Tq, D)`` and the keep mask ``(H, Tq, start + Tq)``."""
        tq = q_pre.shape[1]
        hidden = torch.cat([x.transpose(0, 1).reshape(tq, -1) for x in (q_pre, k_pre, v)], -1)[None]
        pos = torch.arange(start, start + tq)[None]
        past = (None, None, None) if tq > 1 else self.past
        mask2d = torch.ones(1, start + tq, dtype=torch.long)
        rec = _SortRecorder()
        with rec, torch.no_grad():
            out, _, cache = self.attn(hidden, attention_mask=mask2d, position_ids=pos, past_key_value=past[0],
                                      past_query=past[1], past_global_key_value=past[2], use_cache=True)
        self.past = cache
        out = out[0].reshape(tq, self.h, self.d).transpose(0, 1)
        keep = self._prefill_keep(rec.values, tq) if tq > 1 else self._decode_keep(rec.values, start)
        return out, keep

    def _prefill_keep(self, sorted_chunks, tq: int) -> torch.Tensor:
        keep = torch.ones(self.h, tq, tq, dtype=torch.bool).tril()
        if tq < self.length:
            return keep
        chunks = sorted_chunks[0][0][:, : tq - self.length]  # (H, S, n) for queries at positions length..tq-1
        s = chunks.shape[1]
        packed = (chunks[..., None] * WINDOW + torch.arange(WINDOW)).reshape(self.h, s, -1)  # (H, S, n*W)
        rel = (self.n - 1) * WINDOW + torch.arange(s) % WINDOW  # keys the official forward keeps per query
        valid = torch.arange(packed.shape[-1])[None, :] < rel[:, None]
        rows = torch.zeros(self.h, s, tq + 1, dtype=torch.bool)
        rows.scatter_(-1, torch.where(valid, packed, tq), True)
        keep[:, self.length:] = rows[..., :tq]
        return keep

    def _decode_keep(self, sorted_chunks, p: int) -> torch.Tensor:
        seq = p + 1
        g = seq // WINDOW
        if not sorted_chunks:  # below begin_selective_length: dense
            return torch.ones(self.h, 1, seq, dtype=torch.bool)
        mid = sorted_chunks[0][0]  # (H, n - 3)
        chunks = torch.cat([torch.zeros(self.h, 1, dtype=torch.long), mid, torch.full((self.h, 1), g - 1)], -1)
        keep = torch.zeros(self.h, seq + 1, dtype=torch.bool)
        packed = (chunks[..., None] * WINDOW + torch.arange(WINDOW)).reshape(self.h, -1)
        keep.scatter_(-1, packed, True)
        keep[:, g * WINDOW: seq] = True
        return keep[:, None, :seq]

    def reencoded_check(self, q_pre, k_pre, v, keep_row, inv_freq) -> torch.Tensor:
        """One head's decode query ``q_pre`` ``(1, D)`` over ``k_pre``/``v`` ``(T, D)``: softmax attention over
        ``keep_row``'s keys re-encoded at packed positions ``0..L-1`` (query at ``L-1``), ``(1, D)``. Equal to the
        official output when the recorded selection is what the official forward attended."""
        idx = keep_row.nonzero().squeeze(-1)
        ang = torch.arange(idx.numel()).float()[:, None] * inv_freq[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        k = H._unrotate(k_pre[idx], cos, -sin)  # rotating = un-rotating by the negative angle
        q = H._unrotate(q_pre, cos[-1:], -sin[-1:])
        p = torch.softmax((q @ k.transpose(-1, -2)) * self.d ** -0.5, -1)
        return p @ v[idx]


# ---- seqtool's selection on the same calls ----------------------------------------------------------------------
def seqtool_method(budget: float, score: str, inv_freq: torch.Tensor):
    """seqtool's ``longheads`` as the quality table runs it, ``score`` = chunk (official frame) or absolute."""
    from seqtool.patches.longheads import LongHeadsMethod

    method = LongHeadsMethod(budget=budget, min_len=0, block_size=WINDOW, trained_len=2048, score=score)
    rotary = nn.Module()
    rotary.register_buffer("inv_freq", inv_freq.clone())
    method.prepare(rotary)
    return method


def seqtool_keep(method, q, k, v, scale, layer, state, start: int) -> torch.Tensor:
    """seqtool's keep mask ``(H, Tq, start + Tq)`` for post-RoPE ``q`` ``(H, Tq, D)`` over ``k``/``v`` so far."""
    from seqtool.patches.base import AttnCall

    call = AttnCall(q=q[None], k=k[None], v=v[None], scale=scale, layer_idx=layer, rows=torch.arange(1),
                    key_offset=0, cache=state)
    sel = method.select(call) if q.shape[1] > 1 else method.select_decode(call)
    return sel.mask()[0]


# ---- 1. selections on the captures --------------------------------------------------------------------------------
def compare_capture(official, cap: dict, budget: float, heads, scores: list[str]) -> dict:
    t = len(cap["input_ids"])
    split = t - TAIL
    length = int(round(budget * t))
    methods = {sc: seqtool_method(budget, sc, cap["inv_freq"]) for sc in scores}
    rows, checks = [], []
    for layer in sorted(cap["layers"]):
        e = cap["layers"][layer]
        off = OfficialLayer(official, cap["n_heads"], cap["head_dim"], length, cap["inv_freq"])
        states = {sc: SimpleNamespace(state={}) for sc in scores}
        off(e["q_pre"][:, :split], e["k_pre"][:, :split], e["v"][:, :split], 0)
        for sc in scores:
            seqtool_keep(methods[sc], e["q"][:, :split], e["k"][:, :split], e["v"][:, :split], cap["scale"], layer,
                         states[sc], 0)
        for p in range(split, t):
            o_out, o_keep = off(e["q_pre"][:, p:p + 1], e["k_pre"][:, p:p + 1], e["v"][:, p:p + 1], p)
            s_keep = {sc: seqtool_keep(methods[sc], e["q"][:, p:p + 1], e["k"][:, :p + 1], e["v"][:, :p + 1],
                                       cap["scale"], layer, states[sc], p) for sc in scores}
        o_row = o_keep[:, 0]  # the answer query (last prompt token, decoded)
        ref = torch.stack([off.reencoded_check(e["q_pre"][h, t - 1:t], e["k_pre"][h], e["v"][h], o_row[h],
                                               cap["inv_freq"].float())[0] for h in range(cap["n_heads"])])
        checks.append(float((ref - o_out[:, 0]).abs().max()))
        o_nr, o_ar = H.needle_recall(cap, layer, o_row), H.answer_recall(cap, layer, o_row)
        ranks = needle_chunk_ranks(cap, layer, off.past[2][0][0], e["q_pre"][:, -1])
        per = {}
        for sc in scores:
            s_row = s_keep[sc][:, 0]
            per[sc] = (H.needle_recall(cap, layer, s_row), H.answer_recall(cap, layer, s_row),
                       H.kept_overlap(o_row, s_row), s_row.sum(-1))
        for h in range(cap["n_heads"]):
            row = {"layer": layer, "head": h, "needle_head": (layer, h) in heads,
                   "official": {"needle_recall": round(float(o_nr[h]), 3), "answer_recall": round(float(o_ar[h]), 3),
                                "kept": int(o_row[h].sum()), "needle_chunk_rank": ranks[0][h],
                                "needle_chunk_rank_exact": ranks[1][h], "middle_chunks": ranks[2]}}
            for sc, (nr, ar, ov, kept) in per.items():
                row[f"seqtool_{sc}"] = {"needle_recall": round(float(nr[h]), 3),
                                        "answer_recall": round(float(ar[h]), 3),
                                        "overlap_with_official": round(float(ov[h]), 3), "kept": int(kept[h])}
            rows.append(row)
    return {"capture_depth": cap["depth"], "needle_pos": cap["needle_pos"], "budget": budget,
            "atten_length": length, "rows": rows, "reencode_check_max_abs": max(checks)}


def needle_chunk_ranks(cap: dict, layer: int, chunk_keys: torch.Tensor, q_pre: torch.Tensor):
    """Rank (1 = best) of the needle's chunk among the middle chunks ``1..g-2`` the official decode scores, per
    head: by the official score (``q_pre · chunk key``, ``chunk_keys`` ``(H, g, D)`` from its cache) and by the
    exact attention (the chunk's largest dense probability at the answer query). The needle's chunk = the chunk
    holding most of the needle sentence's dense mass (per head)."""
    g = chunk_keys.shape[1]
    p = H.dense_probs(cap, layer)[:, 0]  # (H, T)
    span = torch.zeros(p.shape[-1], dtype=torch.bool)
    span[cap["needle_pos"]:cap["needle_pos"] + cap["needle_len"]] = True
    per_chunk = (p * span).reshape(p.shape[0], -1, WINDOW).sum(-1)[:, :g]  # (H, g)
    target = per_chunk.argmax(-1)
    official = torch.einsum("hd,hgd->hg", q_pre.float(), chunk_keys.float())[:, 1:g - 1]
    exact = p.reshape(p.shape[0], -1, WINDOW).amax(-1)[:, 1:g - 1]

    def rank(sc):
        t = (target - 1).clamp(0, g - 3)
        mine = sc.gather(-1, t[:, None])
        return [int(r) if 1 <= int(c) <= g - 2 else None for r, c in zip(((sc > mine).sum(-1) + 1), target)]

    return rank(official), rank(exact), g - 2


# ---- 2. passkey with the official selection / official attention ------------------------------------------------
class OfficialRunner:
    """Per-layer official state across one prompt's prefill and decode calls (reset by each prefill)."""

    def __init__(self, official, loaded, budget: float, seq_len: int):
        from seqtool.arch.registry import head_counts

        self.official, self.hq, self.hkv, self.d = official, *head_counts(loaded.model.config)
        assert self.hq == self.hkv, "the official LongHeads code is MHA-only"
        rot = loaded.model.model.rotary_emb
        self.inv_freq, self.length = rot.inv_freq.float(), int(round(budget * seq_len))
        self.layers: dict[int, OfficialLayer] = {}

    def _pre(self, x, start):
        pos = torch.arange(start, start + x.shape[-2]).float()
        ang = pos[:, None] * self.inv_freq[None]
        return H._unrotate(x, torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))

    def run(self, layer, q, k, v):
        """Post-RoPE ``q`` ``(1, H, Tq, D)``, ``k``/``v`` ``(1, H, Tk, D)`` → (official output, keep mask)."""
        tq, tk = q.shape[2], k.shape[2]
        start = tk - tq
        if tq > 1:
            self.layers[layer] = OfficialLayer(self.official, self.hq, self.d, self.length, self.inv_freq)
        q_pre = self._pre(q[0].float(), start)
        k_pre = self._pre(k[0, :, start:].float(), start)
        out, keep = self.layers[layer](q_pre, k_pre, v[0, :, start:].float(), start)
        return out[None].to(q.dtype), keep[None]


def passkey_official_selection(loaded, samples, runner: OfficialRunner) -> list[bool]:
    """Masked dense attention (original positions) restricted to the official selection: the harness's
    ``passkey_with_selector`` protocol, with ``v`` taken from the harness's observe hook."""
    stash = {}

    def observe(layer, q, k, v, scale):
        stash[layer] = v

    def selector(layer, q, k):
        return runner.run(layer, q, k, stash[layer])[1]

    with H._selection_attention(loaded.model, selector, observe):
        return H.answer_passkeys(loaded, samples, TAIL)


def _official_attention(model, runner: OfficialRunner):
    """Every attention layer returns the official LongHeads output (re-encoded positions, as the paper runs)."""

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out, _ = runner.run(module.layer_idx, query, key, value)
        return out.transpose(1, 2).contiguous(), None

    return H.attention_function(model, attend)


def passkey_official_attention(loaded, samples, runner: OfficialRunner) -> list[bool]:
    with _official_attention(loaded.model, runner):
        return H.answer_passkeys(loaded, samples, TAIL)


def passkey_seqtool(loaded, samples, spec: str) -> list[bool]:
    from seqtool.patches import apply_attn_spec

    handle = apply_attn_spec(loaded.model, spec)
    try:
        return H.answer_passkeys(loaded, samples, TAIL)
    finally:
        handle.remove()


# ---- report -------------------------------------------------------------------------------------------------------
def eval_summary(path: Path) -> dict:
    """The parts of a ``seqtool eval --json`` output the report needs, with the command that reproduces it."""
    r = json.loads(path.read_text())
    task = ",".join(r["tasks"])
    out = {"attn": r["attn"], "task": task, "scores": r["scores"], "ppl": r.get("ppl") or [],
           "recall_answer": (r.get("recall") or [{}])[0].get("answer"), "seconds": r.get("seconds")}
    depths = ",".join(f"{d:g}" for d in r["depths"])
    attn = f" --attn {r['attn']}" if r["attn"] else ""
    extra = f" --samples {r['samples']} --depths {depths} --recall" if task != "ppl" else " --ppl-tokens 8191"
    out["command"] = f"python -m seqtool eval {r['model']} --task {task} --seq-len 2k{extra}{attn} --json"
    return out


def _eval_rows(evals: list[dict]) -> list[str]:
    """One row per eval: passkey accuracy at the middle depths and at all depths, or the perplexity."""
    out = []
    for r in evals:
        if r["task"] == "ppl":
            out.append(f"| `{r['attn'] or 'dense'}` | ppl {r['ppl'][0]['ppl']:.2f} ({r['ppl'][0]['tokens']} tokens) "
                       f"| | | `{r['command']}` |")
            continue
        sc = r["scores"]
        mid = [s for s in sc if 0 < s["depth"] < 1]
        acc = lambda rows: sum(s["accuracy"] * s["samples"] for s in rows) / max(1, sum(s["samples"] for s in rows))
        rec = r["recall_answer"]
        out.append(f"| `{r['attn']}` | passkey {acc(mid):.2f} ({sum(s['samples'] for s in mid)}) | {acc(sc):.2f} "
                   f"({sum(s['samples'] for s in sc)}) | {'–' if rec is None else f'{rec:.3f}'} | `{r['command']}` |")
    return out


def report(result: dict) -> str:
    """Markdown tables of ``result`` (and of the seqtool eval JSON files)."""
    scores = result.get("scores", [])
    lines = [f"Official code: {result['official_repo']} @ `{result['official_commit']}`, "
             f"{result['official_code']}. Run under a CPU shim (flash_attn → torch softmax attention; projections → "
             "slices of the captured q/k/v), see the script's docstring.", "",
             "Parameters matched at 2048 tokens: official `window_size` = seqtool `block_size` = 64; `atten_length` = "
             "budget × 2048 (0.5 → 1024 = 16 chunks, 0.25 → 512 = 8 chunks: first + previous + own + 13 / 5 by "
             "score; its decode keeps first + n-3 by score + last full chunk + the open chunk); "
             "`begin_selective_length` = `atten_length`. seqtool: `longheads:budget=B,min_len=0,trained_len=2048` "
             "(first + 2 local chunks + the budget rounded up to chunks; one more chunk than the official decode when "
             "the query ends a chunk). Captures: `python benchmarks/peers/selection_harness.py capture --model ref "
             "--seq-len 2048 --depths 0.25,0.5,0.75 -o /tmp/caps` (dense q/k/v of ref, seed 0).", "",
             "### Selection at the answer query (last prompt token, decoded after a 2032-token prefill)", "",
             "NR = needle recall (share of the answer query's dense mass on the needle sentence that the keep set "
             "keeps), AR = answer recall (share of all its dense mass), kept = keys, ov = |∩|/|∪| with the official "
             "keep set. Needle heads: answer query puts ≥ 0.3 of its dense mass on the needle. Needle chunk rank: where the "
             "chunk holding the needle ranks among the middle chunks the official decode scores (it keeps the top "
             "atten_length/64 - 3), by the official score and by the exact attention (largest dense probability in "
             "the chunk).", ""]
    head = "| capture | budget (atten_length) | head | needle chunk rank: official score / exact | official NR / AR / kept |"
    sep = "|---|---|---|---|---|"
    for sc in scores:
        head += f" seqtool score={sc} NR / AR / kept / ov |"
        sep += "---|"
    lines += [head, sep]
    summary = {}
    for c in result["captures"]:
        for row in c["rows"]:
            agg = summary.setdefault(c["budget"], {"n": 0, "off_ar": 0.0, **{f"{sc}_ar": 0.0 for sc in scores},
                                                   "needle": 0, "off_kept": 0, **{f"{sc}_kept": 0 for sc in scores}})
            agg["n"] += 1
            agg["off_ar"] += row["official"]["answer_recall"]
            for sc in scores:
                agg[f"{sc}_ar"] += row[f"seqtool_{sc}"]["answer_recall"]
            if not row["needle_head"]:
                continue
            agg["needle"] += 1
            agg["off_kept"] += row["official"]["needle_recall"] >= 0.5
            o = row["official"]
            line = (f"| d{c['capture_depth']:.2f} | {c['budget']} ({c['atten_length']}) | {row['layer']}.{row['head']} "
                    f"| {o.get('needle_chunk_rank')} / {o.get('needle_chunk_rank_exact')} of {o.get('middle_chunks')} "
                    f"| {o['needle_recall']:.2f} / {o['answer_recall']:.2f} / {o['kept']} |")
            for sc in scores:
                sq = row[f"seqtool_{sc}"]
                agg[f"{sc}_kept"] += sq["needle_recall"] >= 0.5
                line += (f" {sq['needle_recall']:.2f} / {sq['answer_recall']:.2f} / {sq['kept']} / "
                         f"{sq['overlap_with_official']:.2f} |")
            lines.append(line)
    lines += ["", "Over the 3 captures (every layer and head; needle heads with NR ≥ 0.5):", "",
              "| budget | official: mean AR, needle heads kept |"
              + "".join(f" seqtool score={sc}: mean AR, needle heads kept |" for sc in scores),
              "|---|---|" + "---|" * len(scores)]
    for b, a in summary.items():
        lines.append(f"| {b} | {a['off_ar'] / a['n']:.3f}, {a['off_kept']}/{a['needle']} |"
                     + "".join(f" {a[f'{sc}_ar'] / a['n']:.3f}, {a[f'{sc}_kept']}/{a['needle']} |" for sc in scores))
    checks = [c["reencode_check_max_abs"] for c in result["captures"]]
    if checks:
        lines += ["", f"Recorded selection = what the official forward attended: its decode output equals softmax "
                      f"attention over the recorded keys at packed positions, max |Δ| = {max(checks):.2g}."]
    if result["passkey"]:
        lines += ["", "### Passkey, ref at 2048 tokens (prefill, 16 prompt tokens decoded one by one, greedy answer)",
                  "", "| budget | variant | accuracy | prompts | s |", "|---|---|---|---|---|"]
        for r in result["passkey"]:
            lines.append(f"| {r['budget']} | {r['variant']} | {r['accuracy']:.2f} | {len(r['hits'])} | "
                         f"{r['seconds']} |")
    if result.get("seqtool_eval"):
        lines += ["", "### seqtool's `longheads` through `seqtool eval` (default `score=chunk` = after the fix; "
                      "`score=absolute` = before)", "",
                  "| attn | result, depths 0.25-0.75 (prompts) | all depths (prompts) | answer recall | command |",
                  "|---|---|---|---|---|"] + _eval_rows(result["seqtool_eval"])
    commands = [result.get("command")] + [r.get("command") for r in result["passkey"]]
    lines += ["", "Commands (compare.py; x86_64 CPU, 1 thread, shared machine):", ""]
    lines += [f"    {c}" for c in dict.fromkeys(c for c in commands if c)]
    return "\n".join(lines) + "\n"


def _commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # an archive checkout has no .git
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of LuLuLuyi/LongHeads")
    ap.add_argument("--official-commit", default=None, help="recorded in the results (archive checkouts lack .git)")
    ap.add_argument("--deps", type=Path, default=None, help="folder with einops (pip install --target)")
    ap.add_argument("--caps", type=Path, nargs="*", default=[])
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--model", default="ref")
    ap.add_argument("--samples", type=int, default=1, help="passkey prompts per depth (0: skip passkey)")
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scores", default="chunk,absolute", help="seqtool longheads score= variants to compare")
    ap.add_argument("--variants", default="masked,official,seqtool",
                    help="passkey variants: masked (official selection, masked dense), official (official attention), "
                         "seqtool")
    ap.add_argument("--append", action="store_true",
                    help="keep OUT.json's captures and passkey rows, skip the captures, append passkey rows")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json (+ --eval-json)")
    ap.add_argument("--eval-json", type=Path, nargs="*", default=[], help="seqtool eval --json outputs for OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_json = args.out.with_suffix(".json")
    if args.report_only:
        result = json.loads(out_json.read_text())
        if args.eval_json:
            result["seqtool_eval"] = [eval_summary(p) for p in args.eval_json]
            out_json.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(report(result))
        return 0
    if args.deps:
        sys.path.insert(0, str(args.deps))
    official = load_official(args.official)
    budgets = [float(b) for b in args.budgets.split(",")]
    result = {"official_repo": "github.com/LuLuLuyi/LongHeads",
              "official_commit": args.official_commit or _commit(args.official),
              "official_code": "modeling_longheads/modeling_llama.py LlamaAttention.forward (prefill selective "
                               "path and decode path), selection read from its sorted_atten_chunks",
              "window_size": WINDOW, "tail": TAIL, "scores": args.scores.split(","), "captures": [], "passkey": [],
              "command": " ".join(sys.argv), "seqtool_eval": [eval_summary(p) for p in args.eval_json]}

    def save():
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(report(result))

    scores = args.scores.split(",")
    if args.append:
        kept = json.loads(out_json.read_text())
        result["captures"], result["passkey"] = kept["captures"], kept["passkey"]
        result["command"] = kept["command"]
        result["seqtool_eval"] = result["seqtool_eval"] or kept.get("seqtool_eval", [])
    for path in [] if args.append else args.caps:
        cap = H.load_capture(path)
        heads = {(lay, h) for lay, h, _ in H.needle_heads(cap)}
        for b in budgets:
            t0 = time.time()
            r = compare_capture(official, cap, b, heads, scores)
            r["capture"], r["needle_heads"] = path.name, sorted(heads)
            result["captures"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "rows"}), f"{time.time() - t0:.0f}s", flush=True)
            for row in r["rows"]:
                if row["needle_head"]:
                    print("  ", row, flush=True)
            save()
    if args.samples > 0:
        loaded = H.load_model(args.model)
        depths = [float(d) for d in args.depths.split(",")]
        samples = H.passkey_samples(loaded, 2048, depths, args.samples)
        for b in budgets:
            chosen = args.variants.split(",")
            variants = [("official selection (masked dense)", passkey_official_selection)] * ("masked" in chosen)
            variants += [("official attention (re-encoded)", passkey_official_attention)] * ("official" in chosen)
            variants += [(f"seqtool longheads:budget={b},min_len=0,trained_len=2048,score={sc}", None)
                         for sc in scores if "seqtool" in chosen]
            for name, fn in variants:
                t0 = time.time()
                if fn is None:
                    hits = passkey_seqtool(loaded, samples, name.split(" ", 1)[1])
                else:
                    hits = fn(loaded, samples, OfficialRunner(official, loaded, b, 2048))
                row = {"budget": b, "variant": name, "accuracy": sum(hits) / len(hits), "hits": hits,
                       "seconds": round(time.time() - t0), "command": " ".join(sys.argv)}
                result["passkey"].append(row)
                print(json.dumps(row), flush=True)
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
