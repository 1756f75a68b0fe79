"""The shared matrix: every registered method through the checks that cannot be passed by a shortcut."""
from __future__ import annotations

import pytest
import torch

from seqtool.patches import apply_patch, list_methods, make_cache

from .default_methods import BY_NAME, CASES
from .helpers import masked_forward, stitched_masks, tiny

IDS = [c.name for c in CASES]


def _budget(case, value):
    # streaming resolves a ratio against the call's length; a token count keeps prefill/decode windows equal
    if case.name == "streaming" and value != "full":
        return 48
    return value


def _opts(case, budget):
    opts = dict(case.options, min_len=0)
    if case.name != "dense":
        opts["budget"] = _budget(case, budget)
    return opts


def _decode(model, ids, prompt, mask=None, after_prefill=None):
    """Prefill ``ids[:, :prompt]`` then feed the rest one token at a time; logits of every step (B, steps, V)."""
    cache = make_cache(model)
    outs = []
    # Positions count from each row's first real token, as generate() does for left padding.
    pos = None if mask is None else (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        am = None if mask is None else mask[:, :prompt]
        pid = None if pos is None else pos[:, :prompt]
        out = model(ids[:, :prompt], attention_mask=am, position_ids=pid, cache=cache, use_cache=True)
        outs.append(out.logits[:, -1:])
        if after_prefill is not None:
            after_prefill()
        for t in range(prompt, ids.shape[1]):
            am = None if mask is None else mask[:, : t + 1]
            pid = None if pos is None else pos[:, t : t + 1]
            out = model(ids[:, t : t + 1], attention_mask=am, position_ids=pid, cache=cache, use_cache=True)
            outs.append(out.logits[:, -1:])
    return torch.cat(outs, 1), cache


def test_every_method_is_in_the_matrix():
    assert set(list_methods()) <= set(BY_NAME), "add the new method to tests/patches/default_methods.py"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_full_budget_equals_dense(case):
    model = tiny()
    ids = torch.randint(3, 250, (2, 150))
    with torch.no_grad():
        ref = model(ids).logits
    handle = apply_patch(model, case.name, **_opts(case, "full"))
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert handle.kept_fraction() == pytest.approx(1.0)
    calls = sum(rt.sparse_calls for rt in handle.runtimes.values())
    assert calls == len(handle.runtimes) and all(rt.dense_calls == 0 for rt in handle.runtimes.values())
    steps, _ = _decode(model, ids, 140)
    torch.testing.assert_close(steps, ref[:, 139:], atol=1e-5, rtol=0)
    handle.remove()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_budget_above_the_length_is_exact_on_odd_shapes(case):
    """A token budget larger than the sequence keeps every key: logits equal dense on 6 query / 3 KV heads,
    head_dim 16, 300 tokens, batch 2 (vertical_slash once kept only part of the bands there)."""
    model = tiny("odd-16")
    ids = torch.randint(3, 250, (2, 300))
    with torch.no_grad():
        ref = model(ids).logits
    opts = dict(case.options, min_len=0)
    if case.name != "dense":
        opts["budget"] = 1000
    handle = apply_patch(model, case.name, **opts)
    with torch.no_grad():
        out = model(ids).logits
    handle.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_budget_matches_masked_reference(case):
    model = tiny()
    ids = torch.randint(3, 250, (2, 160))
    handle = apply_patch(model, case.name, **_opts(case, 0.25))
    with handle.recording() as records, torch.no_grad():
        out = model(ids).logits
    kept = handle.kept_fraction()
    handle.remove()
    if case.sparse_prefill:
        assert kept < 0.75, f"{case.name} at budget 0.25 kept {kept:.2f} of the causal pairs"
    ref = masked_forward(model, ids, stitched_masks(records, 160))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def check_decode_against_reference(case, model, ids, prompt) -> float:
    """Prefill ``prompt`` tokens then decode the rest with the cache; the logits must equal the reference
    (recorded selections, or the full forward for evicting methods). Returns the decode steps' kept fraction."""
    handle = apply_patch(model, case.name, **_opts(case, 0.25))
    with handle.recording() as records:
        steps, _ = _decode(model, ids, prompt, after_prefill=handle.reset_stats)
    decode_kept = handle.kept_fraction()  # measured against the full causal context, evicted keys included
    if case.decode_reference == "forward":
        with torch.no_grad():
            ref = model(ids).logits[:, prompt - 1:]
        handle.remove()
    else:
        handle.remove()
        ref = masked_forward(model, ids, stitched_masks(records, ids.shape[1]))[:, prompt - 1:]
    torch.testing.assert_close(steps, ref, atol=1e-4, rtol=1e-4)
    return decode_kept


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefill_then_decode_matches_full_forward(case):
    decode_kept = check_decode_against_reference(case, tiny(), torch.randint(3, 250, (2, 128)), 120)
    if case.sparse_decode:
        assert decode_kept < 0.75, f"{case.name} decode kept {decode_kept:.2f}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padded_batch_equals_one_by_one(case):
    model = tiny()
    lengths, total = (120, 90), 126  # prompts, then 6 decoded tokens each
    rows = [torch.randint(3, 250, (1, n + 6)) for n in lengths]
    apply_patch(model, case.name, **_opts(case, 0.25))
    singles = [_decode(model, r, r.shape[1] - 6)[0] for r in rows]
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    batched, _ = _decode(model, ids, width - 6, mask)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-4, rtol=1e-4)


PRESETS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "odd-24"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_family_prefill_and_decode(case, preset):
    """Every method on every registry family (MHA and GQA, fused qkv for phi3) and on odd shapes (6 / 3 heads,
    head_dim 24): prefill then cached decode equal the reference (recorded selections, or the full forward for evicting methods)."""
    check_decode_against_reference(case, tiny(preset), torch.randint(3, 250, (2, 100)), 94)
