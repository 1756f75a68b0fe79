"""Same inputs for comparing a sparse method's key selection with its official code (issue 17).

A *capture* is one passkey prompt run densely through a model, with every layer's queries and keys saved before
and after RoPE, so an official implementation (imported from its own checkout, possibly in another venv: the file
holds only tensors and plain Python values) can select keys on exactly the inputs seqtool's method sees:

    python benchmarks/peers/selection_harness.py capture --model ref --seq-len 2048 --depths 0.25,0.5,0.75 \
        -o /tmp/caps                       # /tmp/caps/passkey-2048-d0.25-s0.pt, ...
    python benchmarks/peers/selection_harness.py heads /tmp/caps/passkey-2048-d0.5-s0.pt   # needle heads

Then, per method (``benchmarks/peers/<method>/``): load a capture (:func:`load_capture`), build the official
selection as a boolean keep mask, and score it with :func:`answer_recall` (share of the dense attention mass the
selection keeps at the answer query) and :func:`needle_recall` (share of the needle's mass kept), side by side
with seqtool's selection (:func:`kept_overlap`). :func:`passkey_with_selector` answers the passkey prompts with
any selector plugged into every layer: a *diagnostic* that computes dense scores and masks them (it measures what
a selection would answer, not speed; seqtool's methods never run this way).

Shapes: ``Hq`` query heads, ``Hkv`` KV heads, ``T`` prompt tokens, ``D`` head dim.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch

#: keep-mask builder for :func:`passkey_with_selector`: ``(layer, q (B,Hq,Tq,D) post-RoPE, k (B,Hkv,Tk,D)
#: post-RoPE) -> bool (B, Hq, Tq, Tk)`` (True = attended; causality is added by the harness) or None (dense).
Selector = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
ATTN_NAME = "seqtool_peer_selection"


def load_model(model: str = "ref"):
    import seqtool

    return seqtool.load(model, dtype="float32", device="cpu")


def passkey_samples(loaded, seq_len: int, depths: list[float], samples: int = 1, seed: int = 0, task: str = "passkey"):
    from seqtool.eval.runner import heldout_tokens
    from seqtool.eval.tasks import make_samples

    tok = loaded.tokenizer
    return make_samples(task, tok, heldout_tokens(tok), seq_len, depths, samples, seed)


def _needle_len(tokenizer, sample) -> int:
    from seqtool.eval.tasks import NIAH_NEEDLE, PASSKEY_NEEDLE, _Encoder

    key, value = sample.meta["needles"][0]
    text = PASSKEY_NEEDLE.format(key=value) if sample.task == "passkey" else NIAH_NEEDLE.format(key=key, value=value)
    return len(_Encoder.get(tokenizer)(text))


def _unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of transformers' ``x * cos + rotate_half(x) * sin`` (a rotation): ``x * cos - rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos - rot * sin


def capture(loaded, sample) -> dict:
    """Dense forward of ``sample``'s prompt; per layer ``q``/``k`` post-RoPE ``(Hq|Hkv, T, D)``, ``q_pre``/``k_pre``
    (RoPE undone), ``v``; plus the prompt, needle span, answer, RoPE ``inv_freq`` and the softmax scale."""
    from seqtool.arch.registry import head_counts

    model = loaded.model
    ids = torch.tensor([sample.input_ids])
    layers: dict[int, dict] = {}

    def grab(layer, q, k, v, scale):
        layers[layer] = {"q": q[0].clone(), "k": k[0].clone(), "v": v[0].clone()}

    with _selection_attention(model, None, grab), torch.no_grad():
        model(ids, use_cache=False)
    pos = torch.arange(ids.shape[1])[None]
    rotary = model.model.rotary_emb
    cos, sin = rotary(layers[0]["q"][None], pos)  # (1, T, D)
    for entry in layers.values():
        entry["q_pre"] = _unrotate(entry["q"], cos, sin)
        entry["k_pre"] = _unrotate(entry["k"], cos, sin)
    hq, hkv, d = head_counts(model.config)
    return {"input_ids": sample.input_ids, "answer": sample.answer, "answer_ids": sample.answer_ids,
            "needle_pos": sample.needle_pos, "needle_len": _needle_len(loaded.tokenizer, sample),
            "depth": sample.depth, "seq_len": sample.seq_len, "n_heads": hq, "n_kv_heads": hkv, "head_dim": d,
            "scale": d ** -0.5, "inv_freq": rotary.inv_freq.clone(),
            "rope_scaling": float(getattr(rotary, "attention_scaling", 1.0)), "layers": layers}


def save_capture(cap: dict, path: str | Path) -> None:
    torch.save(cap, path)


def load_capture(path: str | Path) -> dict:
    return torch.load(path, weights_only=False)


def dense_probs(cap: dict, layer: int, queries: int = 1) -> torch.Tensor:
    """``(Hq, queries, T)`` dense causal attention of the last ``queries`` prompt tokens."""
    e = cap["layers"][layer]
    q, k = e["q"][:, -queries:], e["k"]
    g = q.shape[0] // k.shape[0]
    s = (q @ k.repeat_interleave(g, 0).transpose(-1, -2)) * cap["scale"]
    t = k.shape[1]
    qpos = torch.arange(t - queries, t)[:, None]
    s = s.masked_fill(torch.arange(t)[None, :] > qpos, float("-inf"))
    return torch.softmax(s.float(), -1)


def answer_recall(cap: dict, layer: int, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` bool ``(Hq, T)`` (or ``(Hq, Tq, T)`` for the last Tq queries) → ``(Hq,)`` dense attention mass kept."""
    keep = keep if keep.dim() == 3 else keep[:, None]
    p = dense_probs(cap, layer, keep.shape[1])
    return (p * keep).sum(-1).mean(-1)


def needle_recall(cap: dict, layer: int, keep: torch.Tensor) -> torch.Tensor:
    """``(Hq,)``: of the answer query's dense mass on the needle sentence, the share ``keep`` ``(Hq, T)`` keeps."""
    p = dense_probs(cap, layer)[:, 0]
    span = slice(cap["needle_pos"], cap["needle_pos"] + cap["needle_len"])
    tot = p[:, span].sum(-1)
    return (p[:, span] * keep[:, span]).sum(-1) / tot.clamp_min(1e-12)


def needle_heads(cap: dict, threshold: float = 0.3) -> list[tuple[int, int, float]]:
    """(layer, head, mass) of the heads whose answer query puts ≥ ``threshold`` of its attention on the needle."""
    out = []
    span = slice(cap["needle_pos"], cap["needle_pos"] + cap["needle_len"])
    for layer in sorted(cap["layers"]):
        mass = dense_probs(cap, layer)[:, 0, span].sum(-1)
        out += [(layer, h, round(float(m), 3)) for h, m in enumerate(mass) if m >= threshold]
    return out


def kept_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(H,)`` |a ∩ b| / |a ∪ b| of two bool ``(H, T)`` keep masks (1.0 = the same keys)."""
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


# ---- plugging a selection into a model (diagnostic: dense scores, masked) ------------------------------------------
@contextlib.contextmanager
def attention_function(model, attend):
    """Every attention layer of ``model`` runs ``attend(module, query, key, value, attention_mask, **kwargs) ->
    (out (B, Tq, Hq, D), None)`` (transformers' ``AttentionInterface`` contract) inside the block; a batch of one,
    so no padding mask. The model's previous implementation is restored after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, attend)
    AttentionMaskInterface.register(ATTN_NAME, lambda *a, **k: None)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous or "sdpa")
        AttentionInterface._global_mapping.pop(ATTN_NAME, None)
        AttentionMaskInterface._global_mapping.pop(ATTN_NAME, None)


def _selection_attention(model, selector: Selector | None, observe=None):
    """Every attention layer of ``model`` runs masked dense attention under ``selector`` and reports
    ``(layer, q, k, v, scale)`` to ``observe`` (post-RoPE, k/v with the cache's past)."""

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if observe is not None:
            observe(layer, query, key, value, scale)
        g = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        s = (query @ k.transpose(-1, -2)).float() * scale
        tq, tk = query.shape[2], key.shape[2]
        qpos = torch.arange(tk - tq, tk, device=query.device)[:, None]
        allowed = torch.arange(tk, device=query.device)[None, :] <= qpos
        keep = selector(layer, query, key) if selector is not None else None
        if keep is not None:
            allowed = allowed & keep
        s = s.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(s, -1).to(v.dtype) @ v
        return out.transpose(1, 2).contiguous(), None

    return attention_function(model, attend)


def answer_passkeys(loaded, samples, tail: int = 16) -> list[bool]:
    """Answer each sample with the model as it is now (whatever attention is active): prefill, ``tail`` prompt
    tokens one by one, greedy answer; exact-match hits."""
    from seqtool.eval.generate import greedy_generate
    from seqtool.eval.scoring import exact_match, stop_token_ids

    tok = loaded.tokenizer
    hits = []
    with torch.no_grad():
        for s in samples:
            gen = greedy_generate(loaded.model, [s.input_ids], len(s.answer_ids) + 4, pad_id=tok.pad_token_id or 0,
                                  stop_ids=stop_token_ids(tok), tail=tail)
            hits.append(bool(exact_match(tok.decode(gen[0], skip_special_tokens=True), s.answer)))
    return hits


def passkey_with_selector(loaded, samples, selector: Selector | None, tail: int = 16) -> list[bool]:
    """:func:`answer_passkeys` with every layer's attention restricted to ``selector``'s keys."""
    with _selection_attention(loaded.model, selector):
        return answer_passkeys(loaded, samples, tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="dense captures of passkey prompts")
    c.add_argument("--model", default="ref")
    c.add_argument("--task", default="passkey")
    c.add_argument("--seq-len", type=int, default=2048)
    c.add_argument("--depths", default="0.25,0.5,0.75")
    c.add_argument("--samples", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-o", "--out", type=Path, required=True)
    h = sub.add_parser("heads", help="heads whose answer query attends the needle")
    h.add_argument("capture", type=Path)
    h.add_argument("--threshold", type=float, default=0.3)
    args = ap.parse_args(argv)
    if args.cmd == "heads":
        print(json.dumps(needle_heads(load_capture(args.capture), args.threshold)))
        return 0
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    depths = [float(d) for d in args.depths.split(",")]
    for i, s in enumerate(passkey_samples(loaded, args.seq_len, depths, args.samples, args.seed, args.task)):
        path = args.out / f"{args.task}-{args.seq_len}-d{depths[i // args.samples]}-s{i % args.samples}.pt"
        save_capture(capture(loaded, s), path)
        print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
