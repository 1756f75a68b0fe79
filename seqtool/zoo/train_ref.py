"""Train the reference model (preset ``ref``) from scratch on CPU, resumably.

Data: the stdlib's source text (train split, see ``corpus.py``) mixed with
- retrieval prompts (passkey, NIAH, multi-key NIAH, variable tracking) built by ``seqtool.eval.tasks`` with
  the *train* key space and train-split filler, whose answer tokens get their own loss term;
- rows of random (frequent) tokens in which spans are copied at varying distances, with loss on the copies
  only: they grow the content-based induction heads that retrieval needs (a fixed copy distance would be
  solved by a positional head that does not retrieve).
A length curriculum (phases of seq_len x batch) ends at 2048 tokens. Each step's batch depends only on
(seed, step), so a resumed run sees exactly the data it would have seen. The loop is the project's training engine
(:class:`seqtool.train.loop.Trainer`): this module supplies the batches, the loss and the quick evals.

    python -m seqtool.zoo.train_ref --run-dir /path/run            # train (resumes if a checkpoint exists)
    python -m seqtool.zoo.train_ref --run-dir /path/run --export seqtool/zoo/ref
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seqtool.errors import BadInputError
from seqtool.eval.generate import greedy_generate
from seqtool.eval.tasks import NIAH_QUESTION, TASKS, TaskSample, make_sample
from seqtool.zoo import corpus
from seqtool.zoo.ref_card import MANY_NEEDLES
from seqtool.zoo.ref_tokenizer import chunk_text, train_tokenizer

KINDS = ("text", "induction", "multiquery", "multiquery_many", "multiquery_first", "multiquery_far") + TASKS
# ``multiquery_first``: a ``multiquery_many`` row whose first question is about the haystack's first needle;
# ``multiquery_far``: the same with a prompt filling 7/8 or more of the row (the needle is far back)


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``run_dir/config.json`` and in the model card."""

    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 32
    intermediate_size: int = 704
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    # Curriculum: [steps, seq_len, batch] per phase, optionally a 4th item: that phase's sampling mix.
    # These are the settings the shipped checkpoint ended with; its card lists the changes made during the run.
    phases: list = field(default_factory=lambda: [[1560, 256, 32, {"text": 0.1, "induction": 0.55, "passkey": 0.15,
                                                                   "niah": 0.07, "multikey": 0.08, "vt": 0.05}],
                                                  [220, 512, 16], [170, 1024, 8], [150, 2048, 4]])
    lr: float = 3.5e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    answer_loss_weight: float = 1.0
    # Sampling weights of sample kinds (text, induction, passkey, niah, multikey, vt) where a phase sets none.
    mix: dict = field(default_factory=lambda: {"text": 0.3, "induction": 0.3, "passkey": 0.2,
                                               "niah": 0.07, "multikey": 0.08, "vt": 0.05})
    tokenizer_chars: int = 3_000_000
    train_chars: int | None = None  # None: the whole train split
    heldout_chars: int = 400_000
    threads: int = 2
    bf16: bool = True
    ckpt_every_s: float = 240.0
    log_every: int = 10
    eval_every: int = 100
    eval_samples: int = 8
    eval_len: int = 2048
    # Stage 2: start from an exported model dir (its weights and tokenizer) instead of a fresh init.
    init_from: str | None = None
    induction_vocab: int = 1024  # induction rows draw their tokens from this many most frequent tokens
    # [layer, head, weight]: auxiliary loss making that head attend, at each answer position, to the needle token
    # the answer copies (see attn_supervision.py); None: off.
    attn_supervision: list | None = None

    @classmethod
    def retrieval_stage(cls, init_from: str) -> "TrainConfig":
        """Stage 2 of the shipped model: retrieval-heavy training at 2048 tokens from the stage-1 export.

        Stage 1 (the default config, see the card's run notes) learnt the language but only began to copy;
        this stage trains mostly on retrieval prompts of 256-2048 tokens (answer loss) with a text share that
        keeps the language model, and induction rows over a 256-token vocabulary (their copy loss stayed at
        chance in the shipped run: see the card).
        """
        mix = {"text": 0.25, "induction": 0.1, "passkey": 0.25, "niah": 0.1, "multikey": 0.2, "vt": 0.1}
        return cls(init_from=init_from, phases=[[150, 1024, 8, mix], [1800, 2048, 4, mix]], lr=1e-3,
                   min_lr_frac=0.1, warmup=30, weight_decay=0.1, mix=mix, induction_vocab=256, threads=1)

    @classmethod
    def multikey_stage(cls, init_from: str) -> "TrainConfig":
        """Stage 3: key-matched retrieval (multi-key NIAH) from the stage-2 export.

        Most rows are ``multiquery`` rows: a multi-key haystack followed by questions about several of its
        needles, each answered (one supervised key match per answer instead of one per prompt). Layer 3,
        head 3 (the head that already carries stage 2's passkey copy: the most attention on the copied needle
        token of the 8 heads in that layer) gets the attention-supervision loss. A short phase at 768 tokens,
        then 2048 with 2-8, then 8-16 needles, then rows asking about the haystack's first needle, near and far,
        then all of these mixed in 2304-token rows (so 2048-token distances lie inside the trained range).
        The phases after the first two were added while the shipped run went (see its card): this config is
        the final recipe, and the shipped checkpoint's lr schedule differs from it where the total grew.
        """
        short = {"text": 0.2, "passkey": 0.15, "niah": 0.1, "multiquery": 0.55}
        long = {"text": 0.25, "passkey": 0.15, "niah": 0.1, "multikey": 0.1, "multiquery": 0.4}
        many = {"text": 0.25, "passkey": 0.15, "niah": 0.05, "multikey": 0.1, "multiquery_many": 0.45}
        edge = {"text": 0.25, "passkey": 0.15, "niah": 0.05, "multikey": 0.1, "multiquery_many": 0.25,
                "multiquery_first": 0.2}
        far = {"text": 0.25, "passkey": 0.15, "niah": 0.05, "multikey": 0.1, "multiquery_many": 0.2,
               "multiquery_far": 0.25}
        mixed = {"text": 0.2, "passkey": 0.1, "niah": 0.05, "multikey": 0.1, "multiquery": 0.15,
                 "multiquery_many": 0.2, "multiquery_far": 0.2}
        return cls(init_from=init_from, phases=[[600, 768, 16, short], [1260, 2048, 6, long],
                                                [1000, 2048, 6, many], [400, 2048, 6, edge],
                                                [300, 2048, 6, far], [1400, 2304, 6, mixed]], lr=1e-3,
                   min_lr_frac=0.1, warmup=20, weight_decay=0.1, mix=long, answer_loss_weight=2.0,
                   attn_supervision=[3, 3, 1.0], threads=2, eval_every=100)

    @classmethod
    def tiny(cls) -> "TrainConfig":
        """A seconds-long configuration for tests and CI."""
        return cls(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                   intermediate_size=64, max_position_embeddings=1024, phases=[[2, 640, 2]], warmup=1,
                   tokenizer_chars=60_000, train_chars=60_000, heldout_chars=60_000, eval_every=2,
                   eval_samples=1, eval_len=640, ckpt_every_s=0.0, bf16=False)

    @property
    def total_steps(self) -> int:
        return sum(p[0] for p in self.phases)

    def _phase(self, step: int) -> list:
        s = 0
        for ph in self.phases:
            s += ph[0]
            if step < s:
                return ph
        return self.phases[-1]

    def phase_at(self, step: int) -> tuple[int, int]:
        """(seq_len, batch) used at ``step``."""
        ph = self._phase(step)
        return ph[1], ph[2]

    def mix_at(self, step: int) -> dict:
        """Sampling weights of sample kinds at ``step``."""
        ph = self._phase(step)
        return ph[3] if len(ph) > 3 else self.mix

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def build_model(cfg: TrainConfig, tokenizer):
    """A freshly initialised ``LlamaForCausalLM`` of the configured shape (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       max_position_embeddings=cfg.max_position_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       attn_implementation="sdpa")
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(conf)
    return model


def _init_weights(model, cfg: TrainConfig) -> None:
    """Load the stage-1 export's weights (fp32 copy of its tensors) when ``cfg.init_from`` is set."""
    if not cfg.init_from:
        return
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise BadInputError(f"{cfg.init_from} does not match the configured shape "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()


# ---------------------------------------------------------------- data

def prepare_data(cfg: TrainConfig, run_dir: Path):
    """Tokenizer + token streams (train, heldout), built once and cached in ``run_dir``."""
    from transformers import AutoTokenizer

    tok_dir = run_dir / "tokenizer"
    if cfg.init_from and not (tok_dir / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(cfg.init_from).save_pretrained(str(tok_dir))
    if not (tok_dir / "tokenizer.json").exists():
        text = corpus.load_text("train", cfg.tokenizer_chars)
        train_tokenizer(chunk_text(text), vocab_size=cfg.vocab_size, out_dir=tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.model_max_length = 1 << 30  # streams are tokenized in long chunks; windows are cut later
    streams = {}
    for split, limit in (("train", cfg.train_chars), ("heldout", cfg.heldout_chars)):
        f = run_dir / f"{split}_ids.npy"
        if not f.exists():
            text = corpus.load_text(split, limit)
            ids = [i for chunk in tok(chunk_text(text, 65536), add_special_tokens=False)["input_ids"] for i in chunk]
            np.save(f, np.asarray(ids, dtype=np.int16 if len(tok) < 32768 else np.int32))
        streams[split] = np.load(f).astype(np.int64)
    return tok, streams["train"], streams["heldout"]


def _first_fitting(kind: str, tok, train_ids: np.ndarray, plen: int, depth: float, rng: np.random.Generator,
                   distractor_counts) -> TaskSample | None:
    """The train-split ``kind`` prompt of ``plen`` tokens with the first of ``distractor_counts`` that fits."""
    for d in distractor_counts:
        try:
            return make_sample(kind, tok, train_ids, plen, depth, rng, split="train", check_unique=False,
                               distractors=d)
        except BadInputError:
            continue
    return None


def _train_sample(kind: str, tok, train_ids: np.ndarray, plen: int, rng: np.random.Generator):
    """A train-split task prompt of ``plen`` tokens; distractors are reduced until it fits (None if never)."""
    default = {"niah": 1, "multikey": 7, "vt": 1, "passkey": 0}[kind]
    n = int(rng.integers(1, default + 1)) if default > 1 else default
    depth = float(rng.random())
    return _first_fitting(kind, tok, train_ids, plen, depth, rng, range(n, -1, -1))


def _find(seq: list[int], sub: list[int], start: int = 0) -> int:
    """First index >= ``start`` where ``sub`` occurs in ``seq`` (-1 if none)."""
    n = len(sub)
    for i in range(max(0, start), len(seq) - n + 1):
        if seq[i:i + n] == sub:
            return i
    return -1


def _copy_pairs(ids: list[int], needle_pos: int, answer_ids: list[int], answer_start: int) -> list[tuple[int, int]]:
    """(query, key) positions: the position predicting answer token j (``answer_start + j - 1``) and the needle
    token it copies (the answer's tokens as they occur in the needle from ``needle_pos``). [] if not found."""
    src = _find(ids, answer_ids, needle_pos)
    if src < 0:
        return []
    return [(answer_start + j - 1, src + j) for j in range(len(answer_ids))]


def _many_needle_sample(tok, train_ids: np.ndarray, plen: int, rng: np.random.Generator, first: bool = False):
    """A train-split multi-key prompt with ``MANY_NEEDLES`` needles (fewer if they do not fit; None if none);
    ``first``: the queried needle opens the haystack (depth 0)."""
    lo, hi = MANY_NEEDLES
    n, depth = int(rng.integers(lo, hi + 1)), float(rng.random())
    return _first_fitting("multikey", tok, train_ids, plen, 0.0 if first else depth, rng, range(n - 1, 0, -1))


def _multiquery_row(tok, train_ids: np.ndarray, length: int, rng: np.random.Generator, kind: str = "multiquery"):
    """A multi-key NIAH prompt followed by questions about several of its needles, each answered. ``kind``:
    ``multiquery`` (2-8 needles), ``multiquery_many`` (``MANY_NEEDLES`` needles: more questions per row, more
    look-alike keys), ``multiquery_first`` (many, the first question is about the needle that opens the
    haystack) or ``multiquery_far`` (first, with a prompt filling 7/8 or more of the row).

    Returns (ids, kinds, copies) with kinds 1 (LM) / 2 (answer) per token and ``copies`` the (query, key)
    positions of every answer token (see ``_copy_pairs``); None if no prompt fits ``length``.
    """
    if kind != "multiquery":
        lo, hi = (7 * length // 8, length - 64) if kind == "multiquery_far" else (length // 4, length // 2 + 1)
        plen = int(rng.integers(lo, hi))
        s = _many_needle_sample(tok, train_ids, plen, rng, first=kind in ("multiquery_first", "multiquery_far"))
    else:
        plen = int(rng.integers(min(320, length // 2), max(min(320, length // 2) + 1, length - 160)))
        s = _train_sample("multikey", tok, train_ids, plen, rng)
    if s is None or not s.meta["needles"]:
        return None
    enc = lambda text: list(tok.encode(text, add_special_tokens=False))  # noqa: E731
    ids, copies = list(s.input_ids), []
    kinds = [0] + [1] * (len(ids) - 1)
    needles = s.meta["needles"]
    order = [0] + [int(i) + 1 for i in rng.permutation(len(needles) - 1)]
    for n, i in enumerate(order):
        key, value = needles[i]
        question = enc(NIAH_QUESTION.format(key=key)) if n else []
        answer = enc(" " + value)
        if len(ids) + len(question) + len(answer) + 1 > length:
            break
        ids += question
        kinds += [1] * len(question)
        copies += _copy_pairs(ids, 0, answer, len(ids))
        ids += answer
        kinds += [2] * len(answer)
    ids.append(tok.eos_token_id)
    kinds.append(2)
    return ids, kinds, copies


_FREQ: dict[tuple, np.ndarray] = {}


def _frequent_tokens(train_ids: np.ndarray, k: int = 1024) -> np.ndarray:
    """The ``k`` most frequent token ids of the training stream (specials excluded), cached."""
    key = (id(train_ids), k)
    if key not in _FREQ:
        counts = np.bincount(train_ids, minlength=3)
        counts[:3] = 0
        _FREQ[key] = np.sort(np.argsort(-counts, kind="stable")[:min(k, int((counts > 0).sum()))])
    return _FREQ[key]


def _induction_row(ids: np.ndarray, tgt: np.ndarray, rng: np.random.Generator, vocab: np.ndarray,
                   bos: int) -> list[tuple[int, int, int]]:
    """Fill one row (L,) with random tokens containing copied spans; mark the copies' tokens as kind 3.
    Returns the copies as (source start, copy start, length).

    The copy distance varies, so only content-based induction (find the earlier occurrence of the current
    token, predict its successor) lowers the loss, not a fixed relative-position head. Tokens come from the
    frequent part of the vocabulary (rare tokens' tied embeddings are pushed alike by the softmax). Most rows
    hold many short span/copy pairs a few tokens apart, where attention is not yet diluted over hundreds of
    positions and the circuit forms quickly; the rest copy one long span over a long distance.
    """
    length = len(ids)
    ids[0] = bos
    ids[1:] = rng.choice(vocab, size=length - 1)
    copies = []
    if rng.random() < 0.6:
        pos = 1
        while True:
            m, g = int(rng.integers(4, 25)), int(rng.integers(0, 9))
            if pos + 2 * m + g > length:
                break
            ids[pos + m + g:pos + 2 * m + g] = ids[pos:pos + m]
            tgt[pos + m + g + 1:pos + 2 * m + g] = 3
            copies.append((pos, pos + m + g, m))
            pos += 2 * m + g + int(rng.integers(0, 5))
    else:
        n = int(rng.integers(16, (length - 1) // 2 + 1))
        s1 = int(rng.integers(1, length - 2 * n + 1))
        s2 = int(rng.integers(s1 + n, length - n + 1))
        ids[s2:s2 + n] = ids[s1:s1 + n]
        tgt[s2 + 1:s2 + n] = 3
        copies.append((s1, s2, n))
    return copies


def _text_row(ids: np.ndarray, tgt: np.ndarray, train_ids: np.ndarray, rng: np.random.Generator, bos: int) -> None:
    off = int(rng.integers(0, len(train_ids) - len(ids)))
    ids[0] = bos
    ids[1:] = train_ids[off:off + len(ids) - 1]
    tgt[1:] = 1


def make_batch(cfg: TrainConfig, step: int, tok, train_ids: np.ndarray):
    """Batch of step ``step``: ids (B, L), target kinds (B, L): 0 none, 1 LM, 2 answer, 3 induction copy, and
    copies (n, 3): (row, position predicting an answer token, needle token that answer token copies)."""
    length, bsz = cfg.phase_at(step)
    rng = np.random.default_rng([cfg.seed, 7919, step])
    mix = cfg.mix_at(step)
    kinds = list(mix)
    probs = np.array([mix[k] for k in kinds], dtype=float)
    probs /= probs.sum()
    ids = np.full((bsz, length), tok.pad_token_id, dtype=np.int64)
    tgt = np.zeros((bsz, length), dtype=np.int64)
    copies: list[tuple[int, int, int]] = []
    bos = tok.bos_token_id
    for b in range(bsz):
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        if kind == "text":
            _text_row(ids[b], tgt[b], train_ids, rng, bos)
        elif kind == "induction":
            _induction_row(ids[b], tgt[b], rng, _frequent_tokens(train_ids, cfg.induction_vocab), bos)
        elif kind.startswith("multiquery"):
            row = _multiquery_row(tok, train_ids, length, rng, kind)
            if row is None:
                _text_row(ids[b], tgt[b], train_ids, rng, bos)
                continue
            ids[b, :len(row[0])], tgt[b, :len(row[1])] = row[0], row[1]
            copies += [(b, q, k) for q, k in row[2]]
        else:
            plen = int(rng.integers(96 if length <= 256 else length // 4, length - 24 + 1))
            s = _train_sample(kind, tok, train_ids, plen, rng)
            if s is None:  # too short even without distractors: use text instead
                _text_row(ids[b], tgt[b], train_ids, rng, bos)
                continue
            seq = s.input_ids + s.answer_ids + [tok.eos_token_id]
            seq = seq[:length]
            ids[b, :len(seq)] = seq
            tgt[b, 1:plen] = 1
            tgt[b, plen:len(seq)] = 2
            if kind != "vt":
                copies += [(b, q, k) for q, k in _copy_pairs(s.input_ids, s.needle_pos, s.answer_ids, plen)
                           if q < length]
    return torch.from_numpy(ids), torch.from_numpy(tgt), torch.tensor(copies, dtype=torch.long).view(-1, 3)


def compute_loss(model, ids: torch.Tensor, tgt: torch.Tensor, answer_weight: float, probe=None,
                 copies: torch.Tensor | None = None, attn_weight: float = 0.0):
    """LM loss (mean over kind-1 and kind-3 targets) + ``answer_weight`` * answer loss (mean over kind-2 targets)
    [+ ``attn_weight`` * attention-supervision loss: mean -log attention of ``probe``'s head on ``copies``].

    The induction share of the LM term is also reported on its own (``induction``) to watch copying appear.
    """
    # Full-shape logits: selecting rows first would give a new matmul shape every step, and oneDNN's bf16
    # kernels are re-generated per shape (seconds each).
    return _recipe_loss(model(input_ids=ids).logits, ids, tgt, answer_weight, probe, copies, attn_weight)


def _recipe_loss(logits: torch.Tensor, ids: torch.Tensor, tgt: torch.Tensor, answer_weight: float, probe=None,
                 copies: torch.Tensor | None = None, attn_weight: float = 0.0):
    """:func:`compute_loss` from the forward's logits (B, L, V)."""
    logits = logits[:, :-1].float()
    kinds = tgt[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view_as(kinds)
    losses = {}
    total = nll.new_zeros(())
    for name, sel, w in (("lm", (kinds == 1) | (kinds == 3), 1.0), ("answer", kinds == 2, answer_weight)):
        sel = sel.float()
        if sel.sum() > 0:
            loss = (nll * sel).sum() / sel.sum()
            total = total + w * loss
            losses[name] = float(loss.detach())
    ind = (kinds == 3).float()
    if ind.sum() > 0:
        losses["induction"] = float(((nll.detach() * ind).sum() / ind.sum()))
    if probe is not None and copies is not None and len(copies):
        logp = probe.log_prob(copies)
        total = total - attn_weight * logp.mean()
        losses["attn"] = float(-logp.detach().mean())
        losses["attn_mass"] = float(logp.detach().exp().mean())
    return total, losses


# ---------------------------------------------------------------- quick eval

def quick_eval(model, tok, heldout_ids: np.ndarray, task: str, seq_len: int, n: int, seed: int = 12345) -> float:
    """Exact-match accuracy of ``n`` eval-split prompts (held-out filler, eval keys), depths spread over [0, 1]."""
    from seqtool.eval.scoring import exact_match, stop_token_ids

    rng = np.random.default_rng([seed, seq_len, TASKS.index(task)])
    samples = [make_sample(task, tok, heldout_ids, seq_len, i / max(1, n - 1), rng, split="eval") for i in range(n)]
    model.eval()
    gens = greedy_generate(model, [s.input_ids for s in samples], [len(s.answer_ids) + 4 for s in samples],
                           pad_id=tok.pad_token_id, stop_ids=stop_token_ids(tok))
    model.train()
    return float(np.mean([exact_match(tok.decode(g, skip_special_tokens=True), s.answer) for g, s in zip(gens, samples)]))


# ---------------------------------------------------------------- training on the engine

CHECKPOINT = "checkpoint.pt"  # the engine's checkpoint (seqtool.train.loop); holds every weight of the model


class RefBatches:
    """The engine's batch source for this recipe: step ``s`` is ``make_batch(cfg, s)`` (seq_len and batch follow
    the curriculum), with the target kinds and copy pairs as extra tensors for :class:`RefLoss`."""

    heldout = None  # progress is measured by quick retrieval evals instead (see ``train``)

    def __init__(self, cfg: TrainConfig, tok, train_ids: np.ndarray):
        import hashlib

        self.cfg, self.tok, self.train_ids = cfg, tok, train_ids
        self.fingerprint = hashlib.sha1(json.dumps([cfg.seed, len(train_ids), int(train_ids[:4096].sum())])
                                        .encode()).hexdigest()[:16]

    def micro_batches(self, step: int, grad_accum: int, batch: int, seed: int) -> list[dict]:
        ids, tgt, copies = make_batch(self.cfg, step, self.tok, self.train_ids)
        labels = torch.where(tgt > 0, ids, torch.full_like(ids, -100))
        return [{"input_ids": ids, "labels": labels, "kinds": tgt, "copies": copies}]


class RefLoss:
    """:func:`compute_loss` as an engine objective (one process, no accumulation: the recipe's own means)."""

    name = "ref"
    needs_teacher = False
    weight = 1.0

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.probe, self.metrics = cfg, None, {}

    def attach(self, student, teacher) -> None:
        if self.cfg.attn_supervision:
            from seqtool.zoo.attn_supervision import HeadAttentionProbe

            layer, head, _ = self.cfg.attn_supervision
            self.probe = HeadAttentionProbe(student, int(layer), int(head))

    def detach(self) -> None:
        if self.probe is not None:
            self.probe.remove()
            self.probe = None

    def describe(self) -> dict:
        return {"name": self.name, "answer_weight": self.cfg.answer_loss_weight,
                "attn_supervision": self.cfg.attn_supervision}

    def __call__(self, ctx) -> torch.Tensor:
        attn_weight = float(self.cfg.attn_supervision[2]) if self.cfg.attn_supervision else 0.0
        total, parts = _recipe_loss(ctx.logits, ctx.input_ids, ctx.batch["kinds"], self.cfg.answer_loss_weight,
                                    self.probe, ctx.batch["copies"], attn_weight)
        self.metrics = {f"loss_{k}": v for k, v in parts.items()}
        return total


def _log(run_dir: Path, msg: str):
    line = time.strftime("%H:%M:%S ") + msg
    print(line, file=sys.stderr, flush=True)
    with open(run_dir / "train.log", "a") as f:
        f.write(line + "\n")


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    tokens: int
    seconds: float
    last_loss: dict
    exported: str | None = None


def _engine_config(cfg: TrainConfig):
    from seqtool.train.loop import TrainConfig as LoopConfig

    return LoopConfig(steps=cfg.total_steps, batch=1, lr=cfg.lr, warmup=cfg.warmup, min_lr_frac=cfg.min_lr_frac,
                      weight_decay=cfg.weight_decay, betas=(0.9, 0.95), clip=cfg.grad_clip, seed=cfg.seed,
                      save_every=f"{cfg.ckpt_every_s}s" if cfg.ckpt_every_s > 0 else None,
                      bf16="on" if cfg.bf16 else "off", progress="off")


def train(cfg: TrainConfig, run_dir: str | Path, max_steps: int | None = None) -> TrainResult:
    """Train (or resume) in ``run_dir`` until the curriculum ends or ``max_steps`` steps were done this call.

    The loop is the engine's (:class:`seqtool.train.loop.Trainer`): this recipe supplies the batches
    (:class:`RefBatches`), the loss (:class:`RefLoss`) and a per-step callback that logs every ``log_every``
    steps and runs the quick retrieval evals. A run directory with a checkpoint is resumed (a changed config is
    noted, not refused: the shipped run lengthened phases while it went)."""
    from seqtool.train.loop import Trainer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    tok, train_ids, heldout_ids = prepare_data(cfg, run_dir)
    model = build_model(cfg, tok)
    resume = (run_dir / CHECKPOINT).exists()
    if not resume:
        _init_weights(model, cfg)
    model.train()
    objective = RefLoss(cfg)
    window: list[dict] = []
    started: list[int] = []  # the step this call began at

    def on_step(trainer, record: dict) -> None:
        step = trainer.step
        if not started:
            started.append(step - 1)
            if trainer.resumed_from:
                _log(run_dir, f"resumed at step {trainer.resumed_from}")
        start = started[0]
        length, bsz = cfg.phase_at(step - 1)
        record.update(seq_len=length, batch=bsz)
        window.append(record)
        if step % cfg.log_every == 0 or step == cfg.total_steps or (max_steps and step - start == max_steps):
            _log(run_dir, json.dumps({k: v for k, v in record.items() if k != "eval"}))
            window.clear()
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.total_steps):
            ev = {}
            # multikey needs ~300 tokens (7 distractor needles); below that check single-needle NIAH instead.
            checks = [("passkey", length), ("multikey" if length >= 512 else "niah", length)]
            if cfg.attn_supervision and length != 512:  # stage 3 also watches its target at a short length
                checks.append(("multikey", 512))
            if cfg.eval_len != length:
                checks.append(("passkey", cfg.eval_len))
            for task, n_tok in checks:
                try:
                    ev[f"{task}@{n_tok}"] = quick_eval(model, tok, heldout_ids, task, n_tok, cfg.eval_samples)
                except BadInputError as exc:  # never let a monitoring check kill the run
                    _log(run_dir, f"quick eval {task}@{n_tok} skipped: {exc}")
            record["eval"] = ev
            _log(run_dir, f"eval step {step}: {json.dumps(ev)}")

    trainer = Trainer(model, RefBatches(cfg, tok, train_ids), [objective], _engine_config(cfg), run_dir=run_dir,
                      resume=resume, identity={"recipe": asdict(cfg)}, callbacks=[on_step],
                      allow_changes_on_resume=True)
    if not resume:
        _log(run_dir, f"new run{' from ' + cfg.init_from if cfg.init_from else ''}: "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                      f"{len(train_ids)} train tokens, {cfg.total_steps} steps")
    t0 = time.time()
    outcome = trainer.run(max_steps=max_steps)
    tail = outcome.history[-max(1, min(cfg.log_every, len(outcome.history))):] if outcome.history else []
    keys = sorted({k for r in tail for k in r if k.startswith("loss_") and k != "loss_ref"})
    last = {k[5:]: float(np.mean([r[k] for r in tail if k in r])) for k in keys}
    return TrainResult(run_dir=str(run_dir), steps=trainer.step, tokens=outcome.history[-1]["tokens"]
                       if outcome.history else 0, seconds=round(time.time() - t0, 1), last_loss=last)


# ---------------------------------------------------------------- export

def export(run_dir: str | Path, out_dir: str | Path, *, eval_results: dict | None = None,
           notes: str | None = None) -> Path:
    """Write the latest checkpoint of ``run_dir`` as a bf16 HF model dir (safetensors + tokenizer + card).

    ``notes`` (default: ``run_dir/NOTES.md`` if present) go into the card verbatim, e.g. recipe changes made
    while the run was going.
    """
    from transformers import AutoTokenizer, GenerationConfig

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.exists():
        raise BadInputError(f"no checkpoint at {ckpt}; train first")
    cfg = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    tok = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    model = build_model(cfg, tok)
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    missing, unexpected = model.load_state_dict(state["trainable"], strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:  # the tied head is not a separate parameter
        raise BadInputError(f"checkpoint in {run_dir} does not match the configured shape")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    from seqtool.zoo.ref_card import write_card
    old_card = out_dir / "eval.json"
    if eval_results is None and old_card.exists():
        eval_results = json.loads(old_card.read_text())
    if notes is None and (run_dir / "NOTES.md").exists():
        notes = (run_dir / "NOTES.md").read_text()
    write_card(tmp, cfg, state["history"], state["step"], eval_results, notes)
    if eval_results is not None:
        (tmp / "eval.json").write_text(json.dumps(eval_results, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


STAGES = ("retrieval", "multikey")


def make_config(tiny: bool = False, init_from: str | None = None, stage: str = "retrieval") -> TrainConfig:
    """The stage-1 config (fresh init), or a later stage started from ``init_from`` (an exported model):
    ``retrieval`` (stage 2, from the stage-1 export) or ``multikey`` (stage 3, from the stage-2 export); or tiny."""
    if stage not in STAGES:
        raise BadInputError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if init_from is None:
        return TrainConfig.tiny() if tiny else TrainConfig()
    if tiny:  # the tiny shape cannot load a real exported model
        raise BadInputError("--tiny and --init-from cannot be combined")
    if not (Path(init_from) / "config.json").exists():
        raise BadInputError(f"--init-from {init_from}: not a model directory (no config.json)")
    if stage == "multikey":
        return TrainConfig.multikey_stage(str(init_from))
    return TrainConfig.retrieval_stage(str(init_from))


def run(run_dir: str | Path, *, tiny: bool = False, max_steps: int | None = None,
        export_dir: str | Path | None = None, init_from: str | None = None, stage: str = "retrieval") -> TrainResult:
    """Train (resuming if possible) and optionally export: the library call behind ``seqtool zoo train-ref``."""
    cfg = make_config(tiny, init_from, stage)
    result = train(cfg, run_dir, max_steps)
    if export_dir is not None:
        result.exported = str(export(run_dir, export_dir))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m seqtool.zoo.train_ref", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="checkpoint/log directory (resumes if it has checkpoint.pt)")
    p.add_argument("--tiny", action="store_true", help="seconds-long configuration (CI)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this call")
    p.add_argument("--export", default=None, metavar="DIR", help="export the latest checkpoint to DIR and exit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the config's 2)")
    p.add_argument("--eval-json", default=None, help="with --export: eval results JSON to put in the model card")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="later stage: training starting from this export (see --stage)")
    p.add_argument("--stage", default="retrieval", choices=STAGES,
                   help="with --init-from: retrieval (stage 2, from the stage-1 export) or multikey (stage 3)")
    a = p.parse_args(argv)
    if a.export:
        ev = json.loads(Path(a.eval_json).read_text()) if a.eval_json else None
        print(export(a.run_dir, a.export, eval_results=ev))
        return
    cfg = make_config(a.tiny, a.init_from, a.stage)
    if a.threads:
        cfg.threads = a.threads
    print(json.dumps(asdict(train(cfg, a.run_dir, a.max_steps))))


if __name__ == "__main__":
    main()
