"""generate() with beams and several return sequences: the patch cache layers select, repeat and reorder their
per-row state (eviction scores, kept positions, recycled top-K ...) with the rows."""
from __future__ import annotations

import pytest
import torch

from seqtool.patches import apply_patch, make_cache

from .default_methods import CASES
from .helpers import tiny

IDS = [c.name for c in CASES]
NEW = 6


def _opts(case, budget):
    opts = dict(case.options, min_len=0)
    if case.name != "dense":
        opts["budget"] = 48 if case.name == "streaming" and budget != "full" else budget
    return opts


def _generate(model, ids, seed=0, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, cache=make_cache(model), **kw)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_beams_and_return_sequences_equal_dense_at_full_budget(case):
    model = tiny()
    ids = torch.randint(3, 250, (2, 40))
    beams, sampled = dict(num_beams=2, do_sample=False), dict(num_return_sequences=2, do_sample=True, top_k=0)
    ref_beams, ref_sampled = _generate(model, ids, **beams), _generate(model, ids, **sampled)
    handle = apply_patch(model, case.name, **_opts(case, "full"))
    assert torch.equal(_generate(model, ids, **beams), ref_beams)
    assert torch.equal(_generate(model, ids, **sampled), ref_sampled)
    handle.remove()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_beam_scores_equal_one_row_decodes_at_a_sparse_budget(case):
    """Each returned beam's score (sum of log-probs, length_penalty 0) equals a fresh one-row cached decode of
    the same tokens: a cache layer that kept another beam's state (or none) after reordering would differ."""
    model = tiny()
    ids = torch.randint(3, 250, (1, 64))
    apply_patch(model, case.name, **_opts(case, 0.25))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=2,
                             num_return_sequences=2, length_penalty=0.0, output_scores=True,
                             return_dict_in_generate=True, cache=make_cache(model))
    for seq, score in zip(out.sequences, out.sequences_scores):
        cache = make_cache(model)
        total = 0.0
        with torch.no_grad():
            logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
            for t in range(ids.shape[1], seq.shape[0]):
                total += float(logits.log_softmax(-1)[0, seq[t]])
                logits = model(seq[None, t:t + 1], cache=cache, use_cache=True).logits[:, -1]
        assert total == pytest.approx(float(score), abs=1e-3), case.name
