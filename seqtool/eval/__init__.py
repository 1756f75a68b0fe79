"""Evaluation: sliding-window perplexity and synthetic long-context retrieval tasks."""
from seqtool.eval.results import DeltaRow, EvalResult, PplResult, SampleResult, TaskScore
from seqtool.eval.runner import ALL_TASKS, evaluate

__all__ = ["evaluate", "ALL_TASKS", "EvalResult", "TaskScore", "PplResult", "SampleResult", "DeltaRow"]
