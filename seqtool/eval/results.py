"""Result dataclasses of ``seqtool.evaluate`` (plain data: ``dataclasses.asdict`` gives JSON)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampleResult:
    """One generated answer."""

    task: str
    seq_len: int
    depth: float
    index: int
    answer: str
    prediction: str
    correct: bool


@dataclass
class TaskScore:
    """Exact-match accuracy of one task at one length and one requested depth."""

    task: str
    seq_len: int
    depth: float
    samples: int
    accuracy: float


@dataclass
class PplResult:
    """Sliding-window perplexity: ``nll`` is the mean negative log-likelihood per scored token."""

    data: str
    seq_len: int
    stride: int
    tokens: int
    nll: float
    ppl: float


@dataclass
class DeltaRow:
    """``value - baseline`` for one metric (accuracy of a task cell, or perplexity)."""

    task: str
    seq_len: int
    depth: float | None
    metric: str
    value: float
    baseline: float
    delta: float


@dataclass
class RecallRow:
    """Attention recall of a patched model on one retrieval task and length (``evaluate(recall=True)``): the
    share of the dense attention mass its selections kept, on the answer queries (the last prompt token and the
    generated ones) and on every query; ``per_head_answer`` is ``[layer][head]``."""

    task: str
    seq_len: int
    answer: float
    all: float
    per_head_answer: list[list[float]]


@dataclass
class EvalResult:
    """Everything one ``seqtool eval`` run measured."""

    model: str
    tasks: list[str]
    seq_lens: list[int]
    depths: list[float]
    samples: int
    seed: int
    attn: str | None
    scores: list[TaskScore] = field(default_factory=list)
    ppl: list[PplResult] = field(default_factory=list)
    details: list[SampleResult] = field(default_factory=list)
    seconds: float = 0.0
    baseline: "EvalResult | None" = None
    deltas: list[DeltaRow] = field(default_factory=list)
    recall: list[RecallRow] = field(default_factory=list)

    def mean_accuracy(self, task: str, seq_len: int | None = None) -> float:
        """Mean accuracy of ``task`` over depths (and lengths unless ``seq_len`` is given)."""
        rows = [s for s in self.scores if s.task == task and (seq_len is None or s.seq_len == seq_len)]
        total = sum(s.samples for s in rows)
        return sum(s.accuracy * s.samples for s in rows) / total if total else float("nan")
