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
import math
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
        per = {}
        for sc in scores:
            s_row = s_keep[sc][:, 0]
            per[sc] = (H.needle_recall(cap, layer, s_row), H.answer_recall(cap, layer, s_row),
                       H.kept_overlap(o_row, s_row), s_row.sum(-1))
        for h in range(cap["n_heads"]):
            row = {"layer": layer, "head": h, "needle_head": (layer, h) in heads,
                   "official": {"needle_recall": round(float(o_nr[h]), 3), "answer_recall": round(float(o_ar[h]), 3),
                                "kept": int(o_row[h].sum())}}
            for sc, (nr, ar, ov, kept) in per.items():
                row[f"seqtool_{sc}"] = {"needle_recall": round(float(nr[h]), 3),
                                        "answer_recall": round(float(ar[h]), 3),
                                        "overlap_with_official": round(float(ov[h]), 3), "kept": int(kept[h])}
            rows.append(row)
    return {"capture_depth": cap["depth"], "needle_pos": cap["needle_pos"], "budget": budget,
            "atten_length": length, "rows": rows, "reencode_check_max_abs": max(checks)}


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
    from seqtool.eval.generate import greedy_generate
    from seqtool.eval.scoring import exact_match, stop_token_ids

    stash = {}

    def observe(layer, q, k, v, scale):
        stash[layer] = v

    def selector(layer, q, k):
        return runner.run(layer, q, k, stash[layer])[1]

    tok, hits = loaded.tokenizer, []
    with H._selection_attention(loaded.model, selector, observe), torch.no_grad():
        for s in samples:
            gen = greedy_generate(loaded.model, [s.input_ids], len(s.answer_ids) + 4, pad_id=tok.pad_token_id or 0,
                                  stop_ids=stop_token_ids(tok), tail=TAIL)
            hits.append(bool(exact_match(tok.decode(gen[0], skip_special_tokens=True), s.answer)))
    return hits


class _official_attention:
    """Every attention layer returns the official LongHeads output (re-encoded positions, as the paper runs)."""

    def __init__(self, model, runner: OfficialRunner):
        self.model, self.runner = model, runner

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
            out, _ = self.runner.run(module.layer_idx, query, key, value)
            return out.transpose(1, 2).contiguous(), None

        AttentionInterface.register(H.ATTN_NAME, attend)
        AttentionMaskInterface.register(H.ATTN_NAME, lambda *a, **k: None)
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(H.ATTN_NAME)
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        self.model.set_attn_implementation(self.previous or "sdpa")
        AttentionInterface._global_mapping.pop(H.ATTN_NAME, None)
        AttentionMaskInterface._global_mapping.pop(H.ATTN_NAME, None)


def passkey_official_attention(loaded, samples, runner: OfficialRunner) -> list[bool]:
    from seqtool.eval.generate import greedy_generate
    from seqtool.eval.scoring import exact_match, stop_token_ids

    tok, hits = loaded.tokenizer, []
    with _official_attention(loaded.model, runner), torch.no_grad():
        for s in samples:
            gen = greedy_generate(loaded.model, [s.input_ids], len(s.answer_ids) + 4, pad_id=tok.pad_token_id or 0,
                                  stop_ids=stop_token_ids(tok), tail=TAIL)
            hits.append(bool(exact_match(tok.decode(gen[0], skip_special_tokens=True), s.answer)))
    return hits


def passkey_seqtool(loaded, samples, spec: str) -> list[bool]:
    from seqtool.eval.generate import greedy_generate
    from seqtool.eval.scoring import exact_match, stop_token_ids
    from seqtool.patches import apply_attn_spec

    tok, hits = loaded.tokenizer, []
    handle = apply_attn_spec(loaded.model, spec)
    try:
        with torch.no_grad():
            for s in samples:
                gen = greedy_generate(loaded.model, [s.input_ids], len(s.answer_ids) + 4,
                                      pad_id=tok.pad_token_id or 0, stop_ids=stop_token_ids(tok), tail=TAIL)
                hits.append(bool(exact_match(tok.decode(gen[0], skip_special_tokens=True), s.answer)))
    finally:
        handle.remove()
    return hits


# ---- report -------------------------------------------------------------------------------------------------------
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
    ap.add_argument("--caps", type=Path, nargs="+", required=True)
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--model", default="ref")
    ap.add_argument("--samples", type=int, default=1, help="passkey prompts per depth (0: skip passkey)")
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scores", default="chunk,absolute", help="seqtool longheads score= variants to compare")
    ap.add_argument("--skip-captures", action="store_true")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.deps:
        sys.path.insert(0, str(args.deps))
    official = load_official(args.official)
    budgets = [float(b) for b in args.budgets.split(",")]
    result = {"official_repo": "github.com/LuLuLuyi/LongHeads",
              "official_commit": args.official_commit or _commit(args.official),
              "official_code": "modeling_longheads/modeling_llama.py LlamaAttention.forward (prefill selective "
                               "path and decode path), selection read from its sorted_atten_chunks",
              "window_size": WINDOW, "tail": TAIL, "captures": [], "passkey": []}
    out_json = args.out.with_suffix(".json")

    def save():
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1))

    scores = args.scores.split(",")
    for path in [] if args.skip_captures else args.caps:
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
            variants = [("official selection (masked dense)", passkey_official_selection),
                        ("official attention (re-encoded)", passkey_official_attention)]
            variants += [(f"seqtool longheads:budget={b},min_len=0,trained_len=2048,score={sc}", None) for sc in scores]
            for name, fn in variants:
                t0 = time.time()
                if fn is None:
                    hits = passkey_seqtool(loaded, samples, name.split(" ", 1)[1])
                else:
                    hits = fn(loaded, samples, OfficialRunner(official, loaded, b, 2048))
                row = {"budget": b, "variant": name, "accuracy": sum(hits) / len(hits), "hits": hits,
                       "seconds": round(time.time() - t0)}
                result["passkey"].append(row)
                print(json.dumps(row), flush=True)
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
