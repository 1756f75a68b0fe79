"""s2attn / sinklora training attention: exact against the masked dense reference, == causal for one group,
work ~ 1/#groups, reversible registration, through every family's real forward + backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqtool.errors import BadInputError
from seqtool.train.shifted_attention import (ATTN_NAME, ShiftedSpec, apply_shifted_attention, attention_work,
                                             group_layout, shifted_attention_forward)
from seqtool.train.shifted_attention_reference import reference_attention, reference_mask
from seqtool.zoo.presets import TINY_PRESETS, build_preset

SPECS = [("s2attn", 0), ("sinklora", 4), ("sinklora", 7)]


def _qkv(b, hq, hk, t, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype, requires_grad=True) for h in (hq, hk, hk)]


def _grads(out, tensors):
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum(), tensors)


@pytest.mark.parametrize("method,sinks", SPECS)
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (6, 3), (4, 1), (5, 5)])  # MHA, GQA, split cuts a group, MQA, odd
@pytest.mark.parametrize("t,g", [(32, 8), (37, 8), (37, 9), (33, 6)])  # even, odd length, odd group
def test_equals_masked_dense_reference(method, sinks, hq, hk, t, g):
    spec = ShiftedSpec(method, g, sinks)
    q, k, v = _qkv(2, hq, hk, t)
    key_valid = torch.ones(2, t, dtype=torch.bool)
    key_valid[1, :3] = False  # left padding in one row, right padding in the other
    key_valid[0, -2:] = False
    for kv in (None, key_valid):
        out = shifted_attention_forward(q, k, v, spec, key_valid=kv)
        ref = reference_attention(q, k, v, spec, key_valid=kv)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method,sinks", SPECS)
@pytest.mark.parametrize("t", [16, 23])
def test_one_group_is_causal_attention(method, sinks, t):
    q, k, v = _qkv(1, 4, 2, t)
    out = shifted_attention_forward(q, k, v, ShiftedSpec(method, 32, sinks))  # group >= length
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-12)
    for a, b in zip(_grads(out, (q, k, v)), _grads(dense, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_layouts():
    # LongLoRA roll with wrap-around: the last shifted group is the last half group then the first one
    assert group_layout(8, 4, shifted=True, wrap=True).tolist() == [[2, 3, 4, 5], [6, 7, 0, 1]]
    # SinkLoRA segment swap: the first half group is its own segment at the front, nothing wraps
    assert group_layout(8, 4, shifted=True, wrap=False).tolist() == [[-1, -1, 0, 1], [2, 3, 4, 5], [6, 7, -1, -1]]
    assert group_layout(7, 4, shifted=False, wrap=False).tolist() == [[0, 1, 2, 3], [4, 5, 6, -1]]
    # s2attn's wrapped group leaks (like LongLoRA): token 0 of a shifted head sees tokens 6, 7; sinklora never
    assert reference_mask(8, 2, ShiftedSpec("s2attn", 4))[1, 0, 6]
    assert not reference_mask(8, 2, ShiftedSpec("sinklora", 4, 0))[1].triu(1).any()


@pytest.mark.parametrize("method,sinks", SPECS)
@pytest.mark.parametrize("t,groups", [(4096, 4), (8192, 8), (8192, 16)])
def test_work_scales_with_groups(method, sinks, t, groups):
    spec = ShiftedSpec(method, t // groups, sinks)
    kept, dense = attention_work(t, spec, 8)
    assert abs(kept / dense - 1 / groups) < 0.15 / groups, kept / dense


def test_work_count_matches_reference_mask():
    for method, sinks in SPECS:
        for t, g in [(64, 16), (61, 10)]:
            spec = ShiftedSpec(method, g, sinks)
            assert attention_work(t, spec, 6)[0] == int(reference_mask(t, 6, spec).sum())


def test_bad_specs():
    with pytest.raises(BadInputError):
        ShiftedSpec("longlora", 8)
    with pytest.raises(BadInputError):
        ShiftedSpec("s2attn", 8, sinks=4)
    with pytest.raises(BadInputError):
        ShiftedSpec("sinklora", 1)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_real_model_forward_backward(preset):
    model, _ = build_preset(preset, dtype=torch.float64)
    model.train()
    ids = torch.randint(3, 200, (2, 45), generator=torch.Generator().manual_seed(1))
    base_logits, base_grads = _loss_and_grads(model, ids)
    impl_before = model.config._attn_implementation
    # one group == the model's own causal attention, logits and every gradient
    with apply_shifted_attention(model, "sinklora", group_size=64):
        logits, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-10)
    for name, grad in base_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-10, msg=name)
    # odd length (45 = 5 groups of 8 + 5), GQA (tiny presets have 2 KV heads for 4 query heads where not MHA)
    for method in ("s2attn", "sinklora"):
        with apply_shifted_attention(model, method, group_size=8):
            logits, grads = _loss_and_grads(model, ids)
        with apply_shifted_attention(model, method, group_size=8, impl="reference"):
            ref_logits, ref_grads = _loss_and_grads(model, ids)
        assert (logits - base_logits).abs().max() > 1e-3  # grouping really changes the model
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-9)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-9, msg=name)
    # reversible: the model is back to its own attention and nothing stays registered
    from transformers import AttentionInterface

    assert model.config._attn_implementation == impl_before
    assert ATTN_NAME not in AttentionInterface._global_mapping
    torch.testing.assert_close(_loss_and_grads(model, ids)[0], base_logits, rtol=0, atol=0)


def test_padded_batch_through_model():
    model, _ = build_preset("tiny-qwen2", dtype=torch.float64)
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    outs = []
    for impl in ("fast", "reference"):
        with apply_shifted_attention(model, "sinklora", group_size=8, impl=impl):
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(outs[0][:, 5:], outs[1][:, 5:], rtol=0, atol=1e-9)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-9)


def test_nothing_registered_on_import_and_double_apply_refused():
    from transformers import AttentionInterface

    assert ATTN_NAME not in AttentionInterface._global_mapping
    model, _ = build_preset("tiny-llama")
    with apply_shifted_attention(model, "s2attn", group_size=8):
        assert ATTN_NAME in AttentionInterface._global_mapping
        with pytest.raises(BadInputError):
            apply_shifted_attention(model, "sinklora", group_size=8)
    assert ATTN_NAME not in AttentionInterface._global_mapping


def test_group_size_must_divide_the_context():
    from seqtool.train.shifted_attention import resolve_group_size

    assert resolve_group_size(8192, None) == 2048
    assert resolve_group_size(8192, "1k") == 1024
    for bad in ("3000", "16k", "1"):
        with pytest.raises(BadInputError, match="does not divide"):
            resolve_group_size(8192, bad)


def test_cached_calls_fall_back_to_dense_causal():
    """With a KV cache (q_len < kv_len, e.g. generate while the handle is on) the call is dense causal attention."""
    from types import SimpleNamespace

    from seqtool.train.shifted_attention import SPEC_ATTR, seqtool_shifted_attention

    module = SimpleNamespace(training=False, **{SPEC_ATTR: ShiftedSpec("sinklora", 4, 2)})
    q, k, v = _qkv(1, 4, 2, 10)
    out, _ = seqtool_shifted_attention(module, q[:, :, -3:], k, v, None)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[:, :, -3:]
    torch.testing.assert_close(out, dense.transpose(1, 2), rtol=0, atol=1e-12)
