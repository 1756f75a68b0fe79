"""ACT: calibrated output vs a dense reference with damped sink columns, decode with the prompt's sinks, search."""
from __future__ import annotations

import torch

from seqtool.patches import apply_patch, make_cache
from seqtool.patches.act import ActMethod, find_calibration_heads
from seqtool.patches.base import AttnCall

from .helpers import tiny
from .test_hip import check_no_square


def test_calibration_matches_dense_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 80, 16), torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16)
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    k[0, 0, 5] = 6 * u  # a hidden (non-initial) sink for the query heads of KV head 0
    q[0, :2] += 3 * u
    call = AttnCall(q, k, v, 0.25, 0, torch.arange(1), 0)
    method = ActMethod(heads=("0.0", "0.1"), block=16, beta=0.4)
    sel = method.select(call)
    out = sel.attend(q, k, v, 0.25)
    sinks, ok = sel.sinks, sel.sink_ok
    assert ok.any() and all(5 in sinks[0, h][ok[0, h]].tolist() for h in range(2))
    assert (sinks[ok] != 0).all()
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    probs = torch.softmax((q @ kk.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(80, 80).tril().bool(), -1e30), -1)
    ref = probs @ vv
    for h in range(2):
        cols = sinks[0, h][ok[0, h]]
        p = probs[0, h].clone()
        a_s = p[:, cols].sum(-1, keepdim=True)
        p = p * (1 - 0.4 * a_s) / (1 - a_s)
        p[:, cols] = probs[0, h][:, cols] * 0.4
        torch.testing.assert_close(p.sum(-1), torch.ones(80))
        ref[0, h] = p @ vv[0, h]
    # fp32 on both sides; 1 / (1 - a_S) amplifies rounding where the sink holds most of the mass
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # heads 2, 3 are not calibrated: dense


def test_decode_reuses_prompt_sinks_and_matches_forward():
    model = tiny("tiny-qwen3")
    ids = torch.randint(3, 250, (1, 70))
    handle = apply_patch(model, "act", heads=("0.0", "1.3"), alpha=1.0, block=16)
    cache = make_cache(model)
    steps = []
    with torch.no_grad():
        steps.append(model(ids[:, :64], cache=cache, use_cache=True).logits[:, -1:])
        for t in range(64, 70):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        found = {i: layer.state[("act", 0)] for i, layer in enumerate(cache.layers)}
        assert any(bool(ok.any()) for _, ok in found.values())
        for rt in handle.runtimes.values():
            rt.method.pinned = found  # pinned is keyed by layer
        ref = model(ids).logits[:, 63:]
        handle.remove()
        plain = model(ids).logits[:, 63:]
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ref, plain, atol=1e-4)  # calibration changed the model


def test_head_search_returns_valid_heads():
    model = tiny("tiny-llama")
    heads = find_calibration_heads(model, alpha=1.0, length=24, batch=1)
    assert heads == find_calibration_heads(model, alpha=1.0, length=24, batch=1)
    for h in heads:
        layer, head = (int(x) for x in h.split("."))
        assert 0 <= layer < 2 and 0 <= head < 4


def test_no_square_tensor():
    model = tiny("tiny-qwen2")
    apply_patch(model, "act", heads=("0.0", "1.2"), block=16)
    check_no_square(model, torch.randint(3, 250, (1, 200)))
