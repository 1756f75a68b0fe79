"""RazorAttention: compensation token vs a reference, real KV cut in the split cache, decode, padding, probe."""
from __future__ import annotations

import math

import torch

from seqtool.patches import apply_patch, make_cache
from seqtool.patches._probe import induction_scores
from seqtool.patches.base import AttnCall
from seqtool.patches.razor import RazorCacheLayer, RazorMethod, apply_razor, find_retrieval_heads

from .helpers import tiny
from .test_hip import attention_flops, check_no_square


def _reference(q, k, v, mask, scale, compensate):
    """Per query: softmax over the masked keys plus (compensate) one token = mean of the dropped causal keys/values
    weighted by their count."""
    b, hq, tq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros_like(q)
    tk = k.shape[2]
    for h in range(hq):
        kk, vv = k[0, h // g].double(), v[0, h // g].double()
        for i in range(tq):
            pos = tk - tq + i
            keep = mask[0, h, i]
            causal = torch.arange(tk) <= pos
            logits = (kk[keep] @ q[0, h, i].double()) * scale
            vals = vv[keep]
            dropped = causal & ~keep
            if compensate and dropped.any():
                n = int(dropped.sum())
                kbar, vbar = kk[dropped].mean(0), vv[dropped].mean(0)
                logits = torch.cat([logits, (kbar @ q[0, h, i].double() * scale + math.log(n))[None]])
                vals = torch.cat([vals, vbar[None]])
            out[0, h, i] = (torch.softmax(logits, 0) @ vals).float()
    return out


def test_compensation_token_matches_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    call = AttnCall(q, k, v, 0.25, 0, torch.arange(1), 0)
    for compensate in (True, False):
        sel = RazorMethod(budget=32, block=16, heads=("0.1",), compensate=compensate).select(call)
        out = sel.attend(q, k, v, 0.25)
        mask = sel.mask()
        assert mask[0, 2:].sum() == 2 * torch.ones(100, 100).tril().sum()  # retrieval heads 2, 3: every causal key
        torch.testing.assert_close(out, _reference(q, k, v, mask, 0.25, compensate), atol=1e-5, rtol=1e-5)
    assert int(sel.compensation()[2].max()) > 0


def test_split_cache_really_shrinks_and_decode_matches_forward():
    model = tiny("tiny-qwen2")
    ids = torch.randint(3, 250, (1, 128))
    apply_patch(model, "razor", budget=48, min_len=0, block=16, heads=("0.0",))
    cache = make_cache(model)
    steps = []
    with torch.no_grad():
        steps.append(model(ids[:, :120], cache=cache, use_cache=True).logits[:, -1:])
        for t in range(120, 128):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        ref = model(ids).logits[:, 119:]
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-4, rtol=1e-4)
    layer0, layer1 = cache.layers[0], cache.layers[1]
    assert isinstance(layer0, RazorCacheLayer)
    assert layer0.keys.shape[1:3] == (1, 128) and layer1.keys.shape[1:3] == (0, 128)  # retrieval heads: full
    assert layer0.nk.shape[1] == 1 and layer1.nk.shape[1] == 2
    assert layer0.nk.shape[2] <= 48 + 16 and layer1.nk.shape[2] <= 48 + 16  # sinks + window only
    assert int(layer1.cn[0]) == 128 - layer1.nk.shape[2]  # everything else is in the compensation token
    plain = 2 * 2 * 128 * 16 * 4 * 2  # 2 layers x (k, v) x Hkv 2 x T x D x fp32
    assert sum(layer.cache_bytes() for layer in cache.layers) < 0.6 * plain


def test_padded_batch_with_compensation_equals_one_by_one():
    model = tiny("tiny-mistral")
    apply_patch(model, "razor", budget=40, min_len=0, block=16, heads=("1.1",))
    rows = [torch.randint(3, 250, (1, n)) for n in (110, 75)]

    def run(ids, mask, prompt):
        cache, outs = make_cache(model), []
        with torch.no_grad():
            outs.append(model(ids[:, :prompt], attention_mask=None if mask is None else mask[:, :prompt],
                              cache=cache, use_cache=True).logits[:, -1:])
            for t in range(prompt, ids.shape[1]):
                am = None if mask is None else mask[:, : t + 1]
                outs.append(model(ids[:, t : t + 1], attention_mask=am, cache=cache, use_cache=True).logits)
        return torch.cat(outs, 1)

    singles = [run(r, None, r.shape[1] - 5) for r in rows]
    ids = torch.zeros(2, 110, dtype=torch.long)
    mask = torch.zeros(2, 110, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 110 - r.shape[1] :], mask[i, 110 - r.shape[1] :] = r[0], 1
    batched = run(ids, mask, 105)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-4, rtol=1e-4)


def test_retrieval_heads_are_the_top_induction_heads():
    model = tiny("tiny-llama")  # 2 layers x 4 KV heads
    heads = find_retrieval_heads(model, 0.25)
    assert len(heads) == 2 and heads == find_retrieval_heads(model, 0.25)
    scores = induction_scores(model).flatten()  # MHA: one query head per KV head
    top = {f"{i // 4}.{i % 4}" for i in torch.topk(scores, 2).indices.tolist()}
    assert set(heads) == top
    handle = apply_razor(model, budget=0.25, min_len=0, block=16, retrieval_share=0.25)
    assert tuple(handle.options["heads"]) == heads
    handle.remove()


def test_flops_scale_with_budget():
    # The window is resolved once against the prompt (KV kept per head), so a ratio saves less than block_topk's
    # per-query ratio: only the non-retrieval heads' keys beyond the window are skipped.
    model = tiny("tiny-qwen2")
    ids = torch.randint(3, 250, (1, 256))
    flops = {}
    for budget in (32, 96, "full"):
        handle = apply_patch(model, "razor", budget=budget, min_len=0, block=16, heads=("0.0",))
        flops[budget] = attention_flops(model, ids)
        handle.remove()
    assert flops[32] < flops[96] < flops["full"], flops
    assert flops[32] < 0.5 * flops["full"], flops


def test_no_square_tensor_on_sparse_path():
    model = tiny("tiny-qwen2")
    apply_patch(model, "razor", budget=0.25, min_len=0, block=16, heads=("0.0",))
    check_no_square(model, torch.randint(3, 250, (1, 200)))
