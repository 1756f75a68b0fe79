"""Passkey under kvpress presses (runs in the kvpress venv: transformers < 5.3; see requirements.txt).

Reads prompts written by ``benchmarks/kvpress_compare.py`` (token ids, answer, tail), loads the checkpoint with
plain transformers, and for every (press, compression ratio): prefills ``ids[:-tail]`` inside ``press(model)``
(kvpress compresses the KV cache after the prefill), feeds the tail one token at a time outside the press (as
seqtool's eval does) at their original positions (as kvpress's pipeline passes ``position_ids``), generates the answer greedily and scores exact match. Writes JSON rows to ``out``.

    /tmp/kvpress-venv/bin/python benchmarks/peers/kvpress/run_kvpress.py PROMPTS.json CHECKPOINT OUT.json \
        [PRESS,PRESS... [RATIO,RATIO...]]      # default: every press of PRESSES at every ratio of RATIOS
"""
from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "TOVAPress", "KnormPress")
RATIOS = (0.5, 0.75, 0.9)


def answer(model, tok, ids, tail, n_new, press):
    cache = DynamicCache()
    x = torch.tensor([ids])
    with torch.no_grad():
        if press is None:
            out = model(x[:, :-tail], past_key_values=cache, use_cache=True)
        else:
            with press(model):
                out = model(x[:, :-tail], past_key_values=cache, use_cache=True)
        kept = cache.get_seq_length()
        # Positions continue from the original length (as kvpress's own pipeline passes them): a compressed cache
        # is shorter than the tokens seen, so transformers' default (the cache length) would re-use positions.
        for j in range(x.shape[1] - tail, x.shape[1]):
            out = model(x[:, j:j + 1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[j]]))
        gen = []
        for i in range(n_new):
            nxt = out.logits[:, -1].argmax(-1)
            gen.append(int(nxt[0]))
            if nxt[0] == tok.eos_token_id:
                break
            out = model(nxt[:, None], past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[x.shape[1] + i]]))
    return tok.decode(gen, skip_special_tokens=True), kept


def main() -> int:
    import kvpress

    prompts_path, ckpt, out_path = sys.argv[1:4]
    presses = sys.argv[4].split(",") if len(sys.argv) > 4 else PRESSES
    ratios = tuple(float(r) for r in sys.argv[5].split(",")) if len(sys.argv) > 5 else RATIOS
    torch.set_num_threads(1)
    data = json.loads(open(prompts_path).read())
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    for name in (None, *presses):
        for ratio in ((None,) if name is None else ratios):
            press = None if name is None else getattr(kvpress, name)(compression_ratio=ratio)
            t0, hits, kept = time.time(), [], []
            for p in data["prompts"]:
                text, n = answer(model, tok, p["input_ids"], data["tail"], p["n_new"], press)
                words = text.replace(".", " ").split()
                hits.append(bool(words) and words[0] == p["answer"])
                kept.append(n / (len(p["input_ids"]) - data["tail"]))
            rows.append({"press": name or "none", "compression_ratio": ratio, "passkey": sum(hits) / len(hits),
                         "kept_kv": sum(kept) / len(kept), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    open(out_path, "w").write(json.dumps({"kvpress": kvpress.__name__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
