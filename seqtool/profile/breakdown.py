"""Prefill time per module kind (attention, MLP, norms, lm_head, other) from torch.profiler.

Forward hooks open a ``record_function("seqtool::<kind>")`` range around every module of a kind (found through
the family registry, so no family names appear here); the profiler's event tree then gives each range's CPU
time, or on CUDA the device time of the kernels launched inside it. ``other`` is the rest of the prefill
(embedding, rotary tables, mask building, residual adds). The attention kind is the whole attention module:
q/k/v/o projections plus the attention kernel.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from seqtool.arch.registry import decoder_layers, get_family

KINDS = ("attention", "mlp", "norms", "lm_head", "other")
_PREFIX = "seqtool::"


def module_kinds(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Modules of ``model`` grouped by kind (``other`` is implicit)."""
    spec = get_family(model)
    kinds: dict[str, list[nn.Module]] = {"attention": [], "mlp": [], "norms": [], "lm_head": []}
    for layer in decoder_layers(model):
        kinds["attention"].append(getattr(layer, spec.attention))
        kinds["mlp"].append(getattr(layer, spec.mlp))
        kinds["norms"].extend(getattr(layer, name) for name in spec.norms if hasattr(layer, name))
    kinds["norms"].append(model.get_submodule(spec.final_norm))
    kinds["lm_head"].append(model.get_submodule(spec.lm_head))
    return kinds


def _attach_ranges(model: nn.Module) -> list:
    handles = []
    for kind, modules in module_kinds(model).items():
        for module in modules:
            def pre(mod, args, _kind=kind):
                rf = torch.autograd.profiler.record_function(_PREFIX + _kind)
                rf.__enter__()
                mod._seqtool_range = rf

            def post(mod, args, output):
                rf = mod.__dict__.pop("_seqtool_range", None)
                if rf is not None:
                    rf.__exit__(None, None, None)

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    return handles


def profile_breakdown(model: nn.Module, run: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Seconds per module kind (plus ``total``) for one call of ``run`` (a prefill) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    handles = _attach_ranges(model)
    try:
        with profile(activities=activities) as prof:
            with record_function(_PREFIX + "total"):
                run()
            if on_cuda:
                torch.cuda.synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    totals = dict.fromkeys(("total", *KINDS[:-1]), 0.0)
    from torch.autograd import DeviceType

    for event in prof.events():
        # on CUDA, kineto mirrors each range as a GPU-side annotation; count the CPU range (whose
        # device_time_total sums the kernels launched inside it) only once
        if not event.name.startswith(_PREFIX) or event.device_type != DeviceType.CPU:
            continue
        kind = event.name[len(_PREFIX):]
        if kind in totals:
            micros = event.device_time_total if on_cuda else event.cpu_time_total
            totals[kind] += micros / 1e6
    parts = sum(totals[k] for k in KINDS[:-1])
    result = {k: totals[k] for k in KINDS[:-1]}
    result["other"] = max(totals["total"] - parts, 0.0)
    result["total"] = totals["total"]
    return result
