"""Model card (README.md) of the exported reference model: data, curriculum, loss curve, eval results."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

#: Needles per haystack of a ``multiquery_many`` training row of ``ref`` (``multiquery``: 2-8, as multikey).
MANY_NEEDLES = (8, 16)


def _loss_rows(history: list[dict], n_rows: int = 16) -> list[dict]:
    if len(history) <= n_rows:
        return history
    idx = sorted({round(i * (len(history) - 1) / (n_rows - 1)) for i in range(n_rows)})
    return [history[i] for i in idx]


def _ascii_curve(history: list[dict], key: str = "loss_lm", width: int = 60, height: int = 10) -> str:
    pts = [(h["step"], h[key]) for h in history if key in h]
    if len(pts) < 2:
        return ""
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    span = (hi - lo) or 1.0
    cols = [pts[round(i * (len(pts) - 1) / (width - 1))][1] for i in range(width)]
    grid = [[" "] * width for _ in range(height)]
    for x, v in enumerate(cols):
        grid[height - 1 - round((v - lo) / span * (height - 1))][x] = "*"
    lines = [f"{hi - r * span / (height - 1):7.3f} |" + "".join(row) for r, row in enumerate(grid)]
    lines.append(" " * 8 + "+" + "-" * width)
    lines.append(" " * 9 + f"step {pts[0][0]} .. {pts[-1][0]}")
    return "\n".join(lines)


def _eval_section(ev: dict | None) -> str:
    if not ev:
        return "Not evaluated yet: run `seqtool eval ref --task all --seq-len 2k`.\n"
    out = []
    if ev.get("command"):
        out.append(f"Command: `{ev['command']}` ({ev.get('seconds', '?')} s on {ev.get('machine', 'CPU')}).\n")
    for p in ev.get("ppl", []):
        out.append(f"- held-out perplexity ({p['data']}, window {p['seq_len']}, stride {p['stride']}, "
                   f"{p['tokens']} tokens): **{p['ppl']:.3f}** (NLL {p['nll']:.4f})")
    if ev.get("scores"):
        out.append("\n| task | seq_len | depth | samples | accuracy |\n|---|---|---|---|---|")
        for s in ev["scores"]:
            out.append(f"| {s['task']} | {s['seq_len']} | {s['depth']:g} | {s['samples']} | {s['accuracy']:.3f} |")
        means: dict = {}
        for s in ev["scores"]:
            acc = means.setdefault((s["task"], s["seq_len"]), [0.0, 0])
            acc[0] += s["accuracy"] * s["samples"]
            acc[1] += s["samples"]
        out.append("\nMeans: " + ", ".join(f"{t}@{L} = {a / n:.3f}" for (t, L), (a, n) in means.items()))
    if ev.get("notes"):
        out.append("\n" + ev["notes"])
    return "\n".join(out) + "\n"


def _stage_line(cfg) -> str:
    if not cfg.init_from:
        return ""
    if cfg.attn_supervision:
        return ("Trained in three stages, each exported and used as the next one's start: stage 1 (language + first\n"
                "retrieval), stage 2 (`--init-from <stage-1 export>`, retrieval-heavy mix at 2048 tokens) and this\n"
                "checkpoint, stage 3 (`--init-from <stage-2 export> --stage multikey`, key-matched retrieval); see\n"
                "the run notes. The curriculum, mix and loss curve below are stage 3's.")
    return ("Trained in two stages: stage 1 (language + first retrieval, see the run notes) was exported, and this\n"
            "checkpoint is stage 2, `seqtool zoo train-ref --init-from <stage-1 export>` (retrieval-heavy mix at\n"
            "2048 tokens); the curriculum, mix and loss curve below are stage 2's.")


_LOSS_COLUMNS = (("loss_lm", "LM loss (text + copies)"), ("loss_induction", "induction-copy loss"),
                 ("loss_answer", "answer loss"), ("loss_attn", "attention-supervision loss"),
                 ("loss_attn_mass", "supervised head's attention on its targets"))


def _loss_table(history: list[dict]) -> list[str]:
    """Markdown rows of the loss curve; only the loss columns this run logged."""
    cols = [(k, name) for k, name in _LOSS_COLUMNS if any(k in h for h in history)]
    rows = ["| step | seq_len x batch | lr | " + " | ".join(name for _, name in cols) + " |",
            "|---|---|---|" + "---|" * len(cols)]
    for h in _loss_rows(history):
        rows.append(f"| {h['step']} | {h['seq_len']}x{h['batch']} | {h['lr']:.2e} | "
                    + " | ".join(f"{h.get(k, float('nan')):.3f}" for k, _ in cols) + " |")
    return rows


def _extra_data(cfg) -> str:
    """Bullets for the row kinds and losses beyond text and task prompts that ``cfg`` uses."""
    kinds = {k for ph in cfg.phases for k, w in (ph[3] if len(ph) > 3 else cfg.mix).items() if w > 0}
    out = ""
    if "induction" in kinds:
        out += "- Random token strings repeated twice, loss on the second copy only (grows induction heads).\n"
    if any(k.startswith("multiquery") for k in kinds):
        from seqtool.eval.tasks import MULTIKEY_DISTRACTORS
        many = f"{MANY_NEEDLES[0]}-{MANY_NEEDLES[1]}"
        out += ("- Multi-query rows: a multi-key NIAH haystack followed by questions about several of its needles,\n"
                f"  each answered (answer loss on every answer). `multiquery`: 2-{MULTIKEY_DISTRACTORS + 1} needles; "
                f"`multiquery_many`: {many};\n"
                f"  `multiquery_first`: {many}, the first needle asked first; `multiquery_far`: the same from a prompt\n"
                "  filling 7/8 of the row or more.\n")
    if cfg.attn_supervision:
        layer, head, weight = cfg.attn_supervision
        out += (f"- Attention supervision (weight {weight:g}): layer {layer}, head {head} is trained to attend, at each\n"
                f"  position predicting an answer token, to the needle token that answer token copies.\n")
    return out


def write_card(out_dir: Path, cfg, history: list[dict], step: int, eval_results: dict | None,
               notes: str | None = None) -> Path:
    """Write ``out_dir/README.md`` from the run config, its loss history and (optional) eval results."""
    from seqtool.zoo.corpus import corpus_info

    info = corpus_info()
    tokens = history[-1]["tokens"] if history else 0
    rows = _loss_table(history)
    evals = [h for h in history if h.get("eval")]
    ev_rows = "\n".join(f"- step {h['step']}: " + ", ".join(f"{k}={v:.2f}" for k, v in h["eval"].items()) for h in evals)
    cfg_d = asdict(cfg)
    text = f"""# seqtool reference model (`ref`)

A {cfg.num_layers}-layer Llama-architecture causal LM (hidden {cfg.hidden_size}, {cfg.num_heads} heads,
{cfg.num_kv_heads} KV heads, head_dim {cfg.head_dim}, MLP {cfg.intermediate_size}, RoPE theta {cfg.rope_theta:g},
tied embeddings, vocab {cfg.vocab_size} byte-level BPE) trained from scratch on CPU by
`python -m seqtool.zoo.train_ref` (also `seqtool zoo train-ref`). Weights are stored in bf16.
{_stage_line(cfg)}
It exists so that seqtool's rewrites (GQA conversion, pruning, sparse attention) can be measured on a model
that really retrieves; it is not a useful language model.

## Data
- Text: the Python {info.python} standard library sources ({info.n_train_files} train files,
  {info.train_chars:,} characters; one top-level module in eight is held out by hash:
  {info.n_heldout_files} files, {info.heldout_chars:,} characters).
- Synthetic samples built by `seqtool.eval.tasks` with the *train* key space (keys whose hash bucket is
  not the eval bucket) and train-split filler: passkey, NIAH, multi-key NIAH, variable tracking. The answer
  tokens have their own loss term (mean over answer tokens, added to the LM loss).
{_extra_data(cfg)}- Sampling mix{" where a phase sets none" if any(len(ph) > 3 for ph in cfg.phases) else ""}: {cfg_d['mix']}.
- Evaluation prompts use held-out filler, the disjoint eval key space and their own seeds.

## Training
- Curriculum (steps, seq_len, batch): {cfg_d['phases']}; AdamW lr {cfg.lr:g} (warmup {cfg.warmup},
  cosine to {cfg.min_lr_frac:g}x), weight decay {cfg.weight_decay:g}, clip {cfg.grad_clip:g}, bf16 autocast,
  seed {cfg.seed}.
- This checkpoint: step **{step}** of {cfg.total_steps}{" of this stage" if cfg.init_from else ""}, {tokens:,} training tokens{" in this stage" if cfg.init_from else ""}.

{("### Run notes" + chr(10) + notes.strip() + chr(10)) if notes else ""}
### Loss curve
{chr(10).join(rows)}

```
LM loss
{_ascii_curve(history)}
```

### Quick evals during training (8 eval-split prompts each, depths spread over 0..1)
{ev_rows or '- none'}

## Evaluation
{_eval_section(eval_results)}
## Use
```
seqtool eval ref --task all --seq-len 2k
python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('seqtool/zoo/ref')"
```
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path
