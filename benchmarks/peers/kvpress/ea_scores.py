"""Expected-attention key scores of kvpress's ExpectedAttentionPress and seqtool's ``expected_attention`` on the
same prompt, per layer (which keys each keeps). Two halves, one per venv:

    /tmp/kvpress-venv/bin/python benchmarks/peers/kvpress/ea_scores.py kvpress PROMPTS.json CHECKPOINT OUT.pt
    python benchmarks/peers/kvpress/ea_scores.py seqtool PROMPTS.json ref OUT.pt
    python benchmarks/peers/kvpress/ea_scores.py compare A.pt B.pt PROMPTS.json

Prompts as written by ``benchmarks/kvpress_compare.py`` (the first prompt is used; its prefix minus ``tail``).
"""
from __future__ import annotations

import json
import sys

import torch


def kvpress_side(prompts, ckpt, out):
    from transformers import AutoModelForCausalLM, DynamicCache
    import kvpress

    data = json.loads(open(prompts).read())
    ids = torch.tensor([data["prompts"][0]["input_ids"][: -data["tail"]]])
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    press = kvpress.ExpectedAttentionPress(compression_ratio=0.9)
    saved, original = {}, type(press).score

    def score(self, module, *args, **kwargs):
        s = original(self, module, *args, **kwargs)
        saved[module.layer_idx] = s.detach().float().cpu()
        return s

    type(press).score = score
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache(), use_cache=True)
    torch.save(saved, out)


def seqtool_side(prompts, model_name, out):
    import seqtool
    from seqtool.patches import apply_patch, make_cache
    from seqtool.patches import expected_attention as ea

    data = json.loads(open(prompts).read())
    ids = torch.tensor([data["prompts"][0]["input_ids"][: -data["tail"]]])
    loaded = seqtool.load(model_name, dtype="float32", device="cpu")
    saved, original = {}, ea.expected_scores

    def scores(call, *args, **kwargs):
        s = original(call, *args, **kwargs)
        saved[call.layer_idx] = s.detach().float().cpu()
        return s

    ea.expected_scores = scores
    apply_patch(loaded.model, "expected_attention", budget=0.1, min_len=0)
    with torch.no_grad():
        loaded.model(ids, cache=make_cache(loaded.model), use_cache=True)
    torch.save(saved, out)


def compare(a_path, b_path, prompts=None):
    a, b = torch.load(a_path), torch.load(b_path)
    for layer in sorted(a):
        sa, sb = a[layer][0], b[layer][0]  # (Hkv, T)
        n = sa.shape[-1]
        keep = max(1, int(round(0.1 * n)))
        ta, tb = sa.topk(keep, -1).indices, sb.topk(keep, -1).indices
        overlap = [len(set(x.tolist()) & set(y.tolist())) / keep for x, y in zip(ta, tb)]
        rel = ((sa - sb).abs().amax(-1) / sa.abs().amax(-1)).tolist()
        print(f"layer {layer}: kept-set overlap per head {[round(o, 2) for o in overlap]}, "
              f"max rel score diff {[f'{r:.1e}' for r in rel]}")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"kvpress": kvpress_side, "seqtool": seqtool_side, "compare": compare}[mode](*rest)
