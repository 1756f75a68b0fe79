"""seqtool: rewrite Hugging Face causal LMs into cheaper long-context models and measure the cost.

Public API (each returns the same result objects the CLI renders):
``load``, ``save``, ``inspect``, ``profile``, ``evaluate``, ``patch``, ``convert``, ``prune``, ``finetune``.
Importing seqtool patches nothing.
"""
from __future__ import annotations

from seqtool.version import __version__

__all__ = ["load", "save", "inspect", "profile", "evaluate", "patch", "convert", "prune", "finetune", "__version__"]


def load(source, **kwargs):
    """Load a model (directory, preset or cached hub id); see :func:`seqtool.arch.io.load_model`."""
    from seqtool.arch.io import load_model

    return load_model(source, **kwargs)


def save(model, tokenizer, out_dir, **kwargs):
    """Save a model atomically with its recipe; see :func:`seqtool.arch.io.save_model`."""
    from seqtool.arch.io import save_model

    return save_model(model, tokenizer, out_dir, **kwargs)


def inspect(source, **kwargs):
    """Describe a model without allocating weights; see :func:`seqtool.arch.inspect.inspect_model`."""
    from seqtool.arch.inspect import inspect_model

    return inspect_model(source, **kwargs)


def profile(source, **kwargs):
    """Measure latency, memory and KV-cache bytes; see :func:`seqtool.profile.run.profile_model`."""
    from seqtool.profile.run import profile_model

    return profile_model(source, **kwargs)


def evaluate(model, tasks="all", **kwargs):
    """Perplexity and long-context retrieval accuracy; see :func:`seqtool.eval.evaluate`."""
    from seqtool.eval import evaluate as _evaluate

    return _evaluate(model, tasks, **kwargs)


def patch(model, method, **options):
    """Apply a training-free attention patch; returns a handle with ``.remove()``."""
    from seqtool.patches import apply_patch

    return apply_patch(model, method, **options)


def convert(model, to, **options):
    """Structural conversion (``gqa``, ...); see :mod:`seqtool.convert`."""
    from seqtool.convert import convert as _convert

    return _convert(model, to, **options)


def prune(model, ratio, **options):
    """AMP structured pruning; see :mod:`seqtool.convert.prune`."""
    from seqtool.convert.pipeline import prune_model

    return prune_model(model, ratio, **options)


def finetune(model, *, steps, **options):
    """Fine-tune (LoRA or full, weighted objectives) and save merged; see :func:`seqtool.train.finetune.finetune`."""
    from seqtool.train.finetune import finetune as _finetune

    return _finetune(model, steps=steps, **options)
