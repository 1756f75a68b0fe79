import math

import numpy as np
import torch
import torch.nn.functional as F

from seqtool.eval.generate import greedy_generate
from seqtool.eval.perplexity import sliding_window_ppl


def _manual_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_cached_tail_decode_matches_full_forward(tiny):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 200, (60,), generator=g).tolist()
    with torch.no_grad():
        want = _manual_greedy(tiny.model, prompt, 6)
        got = greedy_generate(tiny.model, [prompt], 6, pad_id=0, tail=16)[0]
    assert got == want


def test_batch_left_padding_matches_one_by_one(tiny):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 200, (n,), generator=g).tolist() for n in (70, 41, 55, 23)]
    single = [greedy_generate(tiny.model, [p], 8, pad_id=0)[0] for p in prompts]
    batched = greedy_generate(tiny.model, prompts, 8, pad_id=0)
    assert batched == single


def test_stop_ids_and_limits(tiny):
    prompt = list(range(5, 40))
    free = greedy_generate(tiny.model, [prompt], 5, pad_id=0)[0]
    stopped = greedy_generate(tiny.model, [prompt], 5, pad_id=0, stop_ids={free[1]})[0]
    assert stopped == free[:free.index(free[1]) + 1]
    assert greedy_generate(tiny.model, [prompt, prompt], [2, 4], pad_id=0) == [free[:2], free[:4]]


def test_ppl_single_window_equals_direct_nll(tiny):
    ids = np.arange(4, 104) % 250 + 4
    with torch.no_grad():
        x = torch.tensor([[1] + ids.tolist()])
        want = F.cross_entropy(tiny.model(input_ids=x).logits[0, :-1], x[0, 1:]).item()
    r = sliding_window_ppl(tiny.model, ids, 128, bos_id=1)
    assert r.tokens == len(ids)
    assert math.isclose(r.nll, want, abs_tol=1e-4)


def test_ppl_sliding_scores_each_token_once(tiny):
    ids = (np.arange(300) * 7) % 250 + 4
    r = sliding_window_ppl(tiny.model, ids, 64, stride=24, bos_id=1)
    assert r.tokens == len(ids) and r.stride == 24
    r2 = sliding_window_ppl(tiny.model, ids, 64, stride=24, bos_id=None)
    assert r2.tokens == len(ids) - 1
    assert math.isfinite(r.ppl) and r.ppl > 1
