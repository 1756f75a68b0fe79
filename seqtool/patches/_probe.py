"""Moved to :mod:`seqtool.arch.probe` (shared with ``convert --to hybrid``); re-exported for existing imports."""
from seqtool.arch.probe import attention_maps, copy_probe_ids, induction_scores

__all__ = ["attention_maps", "copy_probe_ids", "induction_scores"]
