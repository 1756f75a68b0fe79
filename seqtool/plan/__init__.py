"""Dry-run plans: what a recipe's steps will do and how much memory each needs, from meta tensors only.

``plan_recipe(model, [("prune", {"ratio": 0.2}), ("convert", {"to": "gqa", "kv_heads": 4})])`` → :class:`Plan`
(``render()`` table, ``to_dict()`` JSON). :mod:`seqtool.plan.measure` measures the real peaks the plans are
checked against (tests, ``benchmarks/memory_plan.py``). See docs/memory_plan.md.
"""
from __future__ import annotations

from seqtool.plan.plan import Plan, StepPlan, UnpredictableStepError, plan_recipe

__all__ = ["Plan", "StepPlan", "UnpredictableStepError", "plan_recipe"]
