"""Training data: read documents, tokenise once (cached), pack into fixed-length rows, split, batch by step.

Sources (``--data``), all read through the ``datasets`` library and never downloaded:
``None``/``"builtin"`` (the stdlib corpus of :mod:`seqtool.zoo.corpus`; its own held-out split is the held-out
set), a text file (one document), a directory of text files (one document each), a ``.jsonl``/``.json`` file
with a ``text`` field, a directory written by ``Dataset.save_to_disk``, or a dataset name already in the local
Hugging Face cache.

Documents are packed back to back as ``[bos] doc eos`` into rows of ``seq_len`` tokens (the separator tells the
model where a document ends). A seeded share of the rows is held out. ``mix_retrieval`` adds the synthetic
retrieval prompts ``train-ref`` learns from (:func:`seqtool.eval.tasks.make_sample`, train key space, filler from
the training rows), padded with label ``-100``. Every process builds the same rows; the rows of optimizer step
``s`` depend only on (seed, s) (:meth:`PackedData.step_rows`), so a resumed run sees the same batches.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqtool.errors import BadInputError

IGNORE = -100
BUILTIN = "builtin"
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
_RETRIEVAL_TASKS = (("passkey", 0.4), ("niah", 0.2), ("multikey", 0.25), ("vt", 0.15))
_MAX_HELDOUT_ROWS = 256
_CACHE_VERSION = 2  # 2: retrieval rows carry their answer mask


@dataclass
class DataConfig:
    """What defines the rows (all of it goes into the cache key and the fingerprint)."""

    source: str | None = None
    seq_len: int = 256
    heldout: float = 0.05
    seed: int = 0
    mix_retrieval: float = 0.0
    max_train_tokens: int | None = None
    text_field: str = "text"


@dataclass
class PackedData:
    """Packed rows. ``train`` (N, L) / ``heldout`` (M, L) token ids; ``train_labels`` (N, L) with ``-100`` where no
    loss is taken (None: labels are the ids); ``fingerprint`` identifies the rows (recorded in the recipe);
    ``train_answers`` (N, L) bool: the answer tokens of the retrieval rows (None: no retrieval rows), handed to
    objectives as ``answer_mask`` (:class:`~seqtool.train.objectives.AnswerLoss`)."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_labels: torch.Tensor | None
    fingerprint: str
    info: dict = field(default_factory=dict)
    train_answers: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.train[idx] if self.train_labels is None else self.train_labels[idx]

    def step_rows(self, step: int, micro: int, batch: int, grad_accum: int, seed: int) -> torch.Tensor:
        """(batch,) row indices of micro-batch ``micro`` of optimizer step ``step``: consecutive slices of a
        seeded permutation per epoch, so they depend only on (seed, step, micro)."""
        n = self.train.shape[0]
        start = (step * grad_accum + micro) * batch
        out = []
        for g in range(start, start + batch):
            epoch, off = divmod(g, n)
            out.append(int(self._perm(epoch, seed)[off]))
        return torch.tensor(out, dtype=torch.long)

    def micro_batches(self, step: int, grad_accum: int, batch: int, seed: int) -> list[dict]:
        """The global micro-batches of optimizer ``step``: ``{"input_ids", "labels"}`` (batch, L) each. This is
        the batch-source interface :class:`~seqtool.train.loop.Trainer` reads; another source (curriculum rows,
        extra tensors for an objective) implements the same method plus ``heldout`` and ``fingerprint``."""
        out = []
        for m in range(grad_accum):
            rows = self.step_rows(step, m, batch, grad_accum, seed)
            mb = {"input_ids": self.train[rows], "labels": self.labels(rows)}
            if self.train_answers is not None:
                mb["answer_mask"] = self.train_answers[rows]
            out.append(mb)
        return out

    def _perm(self, epoch: int, seed: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_perms", {})
        if (epoch, seed) not in cache:
            cache.clear()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[(epoch, seed)] = torch.randperm(self.train.shape[0], generator=gen)
        return cache[(epoch, seed)]


# ---------------------------------------------------------------- reading documents

def _offline() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _builtin_docs(split: str, max_chars: int | None) -> list[str]:
    from seqtool.zoo import corpus

    docs, total = [], 0
    for p in corpus.list_files(split):
        text = corpus._read(p).strip()
        if not text:
            continue
        docs.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return docs


def _column(ds, field_name: str, source: str) -> list[str]:
    if field_name not in ds.column_names:
        raise BadInputError(f"data '{source}' has no '{field_name}' field (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[field_name] if isinstance(t, str) and t.strip()]


def read_documents(source: str | None, text_field: str = "text", cache_dir: Path | None = None) -> list[str]:
    """The documents of ``source`` (see the module docstring), empty ones dropped."""
    _offline()
    if source in (None, BUILTIN):
        return _builtin_docs("train", None)
    datasets = _quiet_datasets()
    kw: dict[str, Any] = {"cache_dir": str(cache_dir / "hf")} if cache_dir is not None else {}
    path = Path(source).expanduser()
    try:
        if path.is_file():
            if path.stat().st_size == 0:
                raise BadInputError(f"data file '{source}' is empty")
            if path.suffix in (".jsonl", ".json"):
                ds = datasets.load_dataset("json", data_files=str(path), split="train", **kw)
            else:
                ds = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train", **kw)
        elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                                or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
        elif path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES
                           and p.stat().st_size > 0)
            if not files:
                raise BadInputError(f"data directory '{source}' has no non-empty text files "
                                    f"({', '.join(sorted(_TEXT_SUFFIXES))})")
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", **kw)
        elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise BadInputError(f"data '{source}' does not exist; pass a text/JSONL file, a directory or a "
                                "datasets directory")
        else:
            import huggingface_hub.constants as hub_constants

            saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
            datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True  # env vars count only at import
            try:
                ds = datasets.load_dataset(source, split="train")
            except Exception:
                raise BadInputError(f"data '{source}' is neither a local path nor a dataset in the local Hugging "
                                    "Face cache (seqtool never downloads)") from None
            finally:
                datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    except BadInputError:
        raise
    except Exception as exc:  # a malformed file: say which and why, in one line
        raise BadInputError(f"cannot read data '{source}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    docs = _column(ds, text_field, source)
    if not docs:
        raise BadInputError(f"data '{source}' has no text")
    return docs


# ---------------------------------------------------------------- tokenising and packing

def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha1()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()[:12]


def _source_identity(source: str | None) -> Any:
    if source in (None, BUILTIN):
        import sys

        return [BUILTIN, sys.version.split()[0]]
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve())] + [[str(p.relative_to(path) if p != path else ""), p.stat().st_size,
                                         p.stat().st_mtime_ns] for p in files]
    return [source]


def pack(token_docs: list[list[int]], seq_len: int, bos: int | None, eos: int | None) -> torch.Tensor:
    """(rows, seq_len) ids: documents as ``[bos] doc eos`` back to back, the incomplete tail dropped."""
    stream: list[int] = []
    for ids in token_docs:
        stream += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    n = len(stream) // seq_len
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)


def _tokenize(tokenizer, docs: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(docs), 64):
        out += tokenizer(docs[i:i + 64], add_special_tokens=False, verbose=False)["input_ids"]
    return out


def _retrieval_rows(tokenizer, filler: np.ndarray, n: int, seq_len: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` retrieval prompts + answers (train key space), padded: (ids, labels, answer mask) each (n, seq_len)."""
    from seqtool.eval.tasks import make_sample

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    ids = torch.full((n, seq_len), pad, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    answers = torch.zeros((n, seq_len), dtype=torch.bool)
    names, probs = zip(*_RETRIEVAL_TASKS)
    for i in range(n):
        rng = np.random.default_rng([seed, 7919, i])
        task = names[int(rng.choice(len(names), p=probs))]
        plen = int(rng.integers(max(64, seq_len // 4), max(65, seq_len - 16)))
        depth = float(rng.random())
        sample = None
        # Fewer distractors, then the longest prompt the row allows, until it fits.
        for length, d in [(plen, d) for d in (None, 3, 1, 0)] + [(seq_len - 24, 0)]:
            try:
                sample = make_sample(task, tokenizer, filler, length, depth, rng, split="train", check_unique=False,
                                     distractors=d)
                break
            except BadInputError:
                continue
        if sample is None:
            raise BadInputError(f"--seq-len {seq_len} is too short for retrieval rows with this tokenizer "
                                f"('{task}' prompts do not fit); use a longer --seq-len or no --mix-retrieval")
        seq = (sample.input_ids + sample.answer_ids + ([eos] if eos is not None else []))[:seq_len]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, :len(seq)] = torch.tensor(seq)
        answers[i, len(sample.input_ids):min(seq_len, len(sample.input_ids) + len(sample.answer_ids))] = True
    return ids, labels, answers


def build_data(tokenizer, config: DataConfig, cache_dir: str | Path | None = None) -> PackedData:
    """Read, tokenise, pack and split ``config.source`` for ``tokenizer``; cached in ``cache_dir`` when given."""
    if config.seq_len < 8:
        raise BadInputError(f"--seq-len must be at least 8, got {config.seq_len}")
    if not 0.0 <= config.mix_retrieval < 1.0:
        raise BadInputError(f"--mix-retrieval must be in [0, 1), got {config.mix_retrieval}")
    if not 0.0 < config.heldout < 0.5:
        raise BadInputError(f"held-out share must be in (0, 0.5), got {config.heldout}")
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    key = hashlib.sha1(json.dumps([_CACHE_VERSION, asdict(config), _source_identity(config.source),
                                   tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
    cached = cache_dir / f"rows-{key}.pt" if cache_dir is not None else None
    if cached is not None and cached.exists():
        state = torch.load(cached, weights_only=True)
        return PackedData(state["train"], state["heldout"], state.get("train_labels"), state["fingerprint"],
                          json.loads(state["info"]), state.get("train_answers"))
    data = _build(tokenizer, config, cache_dir)
    if cached is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        state = {"train": data.train, "heldout": data.heldout, "fingerprint": data.fingerprint,
                 "info": json.dumps(data.info)}
        if data.train_labels is not None:
            state["train_labels"] = data.train_labels
        if data.train_answers is not None:
            state["train_answers"] = data.train_answers
        try:
            torch.save(state, tmp)
            os.replace(tmp, cached)
        except OSError:
            tmp.unlink(missing_ok=True)  # a cache that cannot be written only costs time
    return data


def _build(tokenizer, config: DataConfig, cache_dir: Path | None) -> PackedData:
    bos, eos, L = tokenizer.bos_token_id, tokenizer.eos_token_id, config.seq_len
    builtin = config.source in (None, BUILTIN)
    max_chars = None if config.max_train_tokens is None else config.max_train_tokens * 6
    docs = _builtin_docs("train", max_chars) if builtin else read_documents(config.source, config.text_field, cache_dir)
    token_docs = _tokenize(tokenizer, docs)
    n_tokens = sum(len(d) for d in token_docs)
    rows = pack(token_docs, L, bos, eos)
    if builtin:
        held_docs = _builtin_docs("heldout", min(_MAX_HELDOUT_ROWS * L * 6, 2_000_000))
        heldout = pack(_tokenize(tokenizer, held_docs), L, bos, eos)[:_MAX_HELDOUT_ROWS]
        train = rows
    else:
        if rows.shape[0] < 2:
            raise BadInputError(f"data '{config.source}' has {n_tokens} tokens, fewer than two rows of --seq-len "
                                f"{L} (one is held out); give more text or a shorter --seq-len")
        gen = torch.Generator().manual_seed(config.seed + 104729)
        perm = torch.randperm(rows.shape[0], generator=gen)
        n_held = min(_MAX_HELDOUT_ROWS, max(1, round(config.heldout * rows.shape[0])))
        held_idx, train_idx = perm[:n_held].sort().values, perm[n_held:].sort().values
        heldout, train = rows[held_idx], rows[train_idx]
    if config.max_train_tokens is not None:
        train = train[:max(1, config.max_train_tokens // L)]
    if train.shape[0] < 1 or heldout.shape[0] < 1:
        raise BadInputError(f"data '{config.source or BUILTIN}' is shorter than one row of --seq-len {L}")
    labels, answers = None, None
    n_ret = 0
    if config.mix_retrieval > 0:
        n_ret = max(1, round(train.shape[0] * config.mix_retrieval / (1 - config.mix_retrieval)))
        r_ids, r_labels, r_answers = _retrieval_rows(tokenizer, train.flatten().numpy(), n_ret, L, config.seed)
        labels = torch.cat([train, r_labels])
        answers = torch.cat([torch.zeros_like(train, dtype=torch.bool), r_answers])
        train = torch.cat([train, r_ids])
    h = hashlib.sha1(train.numpy().tobytes())
    h.update(heldout.numpy().tobytes())
    if labels is not None:
        h.update(labels.numpy().tobytes())
    info = {"source": config.source or BUILTIN, "documents": len(docs), "tokens": n_tokens,
            "train_rows": int(train.shape[0]), "heldout_rows": int(heldout.shape[0]), "retrieval_rows": n_ret,
            "seq_len": L}
    return PackedData(train, heldout, labels, h.hexdigest()[:16], info, answers)


class LengthSchedule:
    """A batch source of phases: steps ``[0, ends[0])`` take rows of ``phases[0]`` (``batches[0]`` rows per
    micro-batch), steps ``[ends[0], ends[1])`` of ``phases[1]`` and so on (e.g. most steps at 512 tokens, then a
    phase at the evaluation length). Within a phase the rows of step ``s`` are the phase's
    ``micro_batches(s - start)``, so they depend only on (seed, s). ``heldout``: the first phase's."""

    def __init__(self, phases: list[PackedData], batches: list[int], ends: list[int]):
        if not (len(phases) == len(batches) == len(ends)) or not phases:
            raise BadInputError("a length schedule needs one batch size and one end step per phase")
        if any(b < 1 for b in batches) or any(e <= s for s, e in zip([0] + ends[:-1], ends)):
            raise BadInputError(f"bad length schedule: batches {batches}, phase ends {ends}")
        self.phases, self.batches, self.ends = phases, batches, ends
        self.heldout = phases[0].heldout
        h = hashlib.sha1(json.dumps([[p.fingerprint for p in phases], batches, ends]).encode())
        self.fingerprint = h.hexdigest()[:16]
        self.info = {**phases[0].info, "schedule": [{"until_step": e, "seq_len": p.seq_len, "batch": b}
                                                    for p, b, e in zip(phases, batches, ends)]}

    @property
    def seq_len(self) -> int:
        return self.phases[0].seq_len

    def micro_batches(self, step: int, grad_accum: int, batch: int, seed: int) -> list[dict]:
        start = 0
        for data, b, end in zip(self.phases, self.batches, self.ends):
            if step < end or end == self.ends[-1]:
                return data.micro_batches(step - start, grad_accum, b, seed)
            start = end
        raise AssertionError("unreachable")
