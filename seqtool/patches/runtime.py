"""Applying and removing patches: the registered attention function, the policy, the handle, the cache.

One attention function, ``seqtool_attention``, is registered with transformers' ``AttentionInterface`` under
:data:`ATTN_NAME` (with a mask function under the same name) the first time a patch is applied; nothing is
patched on import. Each patched attention module gets a :class:`LayerRuntime` (attribute :data:`RUNTIME_ATTR`)
holding its method instance, statistics and the link to its cache layer. ``handle.remove()`` deletes them and
restores the model's previous attention implementation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from seqtool.errors import BadInputError, NotImplementedMethodError, SeqtoolError
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import get_method
from seqtool.patches.selection import Selection, causal_pairs
from seqtool.patches.spec import coerce_options, format_attn_spec, parse_attn_spec

ATTN_NAME = "seqtool"
RUNTIME_ATTR = "_seqtool_runtime"
HANDLE_ATTR = "_seqtool_patch"
#: Options handled by the policy rather than by the method dataclass.
POLICY_KEYS = ("dense_layers", "layers")
#: A per-layer override in a spec / recipe: ``layer1.budget=0.5`` (``Policy.layer_options[1]["budget"]``).
LAYER_KEY = re.compile(r"^layer(\d+)\.(\w+)$")


# ---- policy -----------------------------------------------------------------------------------------------------
@dataclass
class Policy:
    """Which layers get the method. ``dense_layers``: these run ``dense`` (MASFormer-style); ``layers``: if given,
    only these are patched. ``layer_options``: per-layer option overrides (e.g. a larger budget in layer 0).
    Per-head choices (RazorAttention's retrieval heads) are options of the method itself."""

    dense_layers: tuple[int, ...] = ()
    layers: tuple[int, ...] | None = None
    layer_options: dict[int, dict[str, Any]] = field(default_factory=dict)

    def is_patched(self, layer_idx: int) -> bool:
        if layer_idx in self.dense_layers:
            return False
        return self.layers is None or layer_idx in self.layers

    def to_dict(self) -> dict[str, Any]:
        """Flat options (JSON, spec): ``dense_layers``, ``layers`` and one ``layerN.key`` per layer override."""
        out: dict[str, Any] = {}
        if self.dense_layers:
            out["dense_layers"] = list(self.dense_layers)
        if self.layers is not None:
            out["layers"] = list(self.layers)
        for idx in sorted(self.layer_options):
            for key, value in self.layer_options[idx].items():
                out[f"layer{idx}.{key}"] = list(value) if isinstance(value, tuple) else value
        return out


def _pop_layer_options(options: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Move ``layerN.key`` entries out of ``options`` into ``{N: {key: value}}``."""
    out: dict[int, dict[str, Any]] = {}
    for key in [k for k in options if isinstance(k, str) and LAYER_KEY.match(k)]:
        idx, name = LAYER_KEY.match(key).groups()
        if name in POLICY_KEYS:
            raise BadInputError(f"'{key}': {name} is not a per-layer option")
        out.setdefault(int(idx), {})[name] = options.pop(key)
    return out


def _int_tuple(value: Any, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").replace("+", ",").split(",") if v.strip()]
    elif isinstance(value, int):
        value = [value]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise BadInputError(f"{key} must be layer indices like 0,1 — got {value!r}") from None


# ---- per-layer runtime ------------------------------------------------------------------------------------------
@dataclass
class CallRecord:
    """One recorded method call (``handle.recording()``): which batch rows, how many keys skipped at the front
    of the cache tensors, the query offset inside the call's queries, and the selection."""

    rows: torch.Tensor
    key_offset: int
    query_offset: int
    tq: int
    tk_cache: int
    selection: Selection
    dense_fallback: bool
    scale: float = 1.0
    q: torch.Tensor | None = None  # the group's queries/keys, only with recording(capture_qk=True)
    k: torch.Tensor | None = None


@dataclass
class LayerRuntime:
    """State of one patched attention module."""

    layer_idx: int
    method: AttentionMethod
    n_heads: int
    pending_cache: SeqtoolCacheLayer | None = None
    recording: bool = False
    capture_qk: bool = False
    records: list[CallRecord] = field(default_factory=list)
    kept_pairs: torch.Tensor | None = None
    total_pairs: float = 0.0
    sparse_calls: int = 0
    dense_calls: int = 0
    #: A :class:`~seqtool.patches.recall.RecallMeter` observing every call (diagnostics), or None.
    meter: Any = None

    def reset_stats(self) -> None:
        self.kept_pairs = None
        self.total_pairs = 0.0
        self.sparse_calls = self.dense_calls = 0

    def add_stats(self, kept: torch.Tensor, total: float) -> None:
        per_head = kept.sum(0).double().cpu()
        self.kept_pairs = per_head if self.kept_pairs is None else self.kept_pairs + per_head
        self.total_pairs += total


# ---- the attention function -------------------------------------------------------------------------------------
def _left_pads(mask: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
    """Leading padding per row from the 2D mask (B, L) bool; raises on holes that are not left/right padding."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise BadInputError("seqtool patches take a 2D attention mask (batch, tokens) with left padding; got a "
                            f"{mask.dim()}D mask")
    mask = mask.bool()
    length = mask.shape[1]
    first = torch.where(mask.any(1), mask.int().argmax(1), torch.full((batch,), length, device=mask.device))
    last = length - 1 - mask.flip(1).int().argmax(1)
    span = torch.arange(length, device=mask.device)[None, :]
    inside = (span >= first[:, None]) & (span <= last[:, None])
    if bool((inside & ~mask).any()):
        raise BadInputError("attention mask has holes; seqtool patches support left (or trailing) padding only")
    return first.to(device)


def seqtool_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``(B, Hq, Tq, D)``, k/v ``(B, Hkv, Tk, D)`` → ``((B, Tq, Hq, D), None)``.

    Splits the batch into groups of rows with the same left padding, strips the padding (so every method sees
    clean rows and padded batches equal one-by-one runs), and lets the layer's method select and compute.
    """
    rt: LayerRuntime | None = getattr(module, RUNTIME_ATTR, None)
    if rt is None:
        raise SeqtoolError(f"attention module {type(module).__name__} runs 'seqtool' attention but was not patched; "
                           "apply the patch with seqtool.patches.apply_patch(model, ...)")
    if dropout and module.training:
        raise NotImplementedMethodError("seqtool patches are inference-only; call model.eval()")
    cache = rt.pending_cache
    rt.pending_cache = None
    if cache is not None and cache.keys is not key:
        cache = None  # stale link (the layer ran with another cache object)
    bsz, _, tq, _ = query.shape
    tk = key.shape[2]
    if sliding_window is not None and tk > sliding_window:
        raise NotImplementedMethodError(f"layer {rt.layer_idx} uses a native sliding window ({sliding_window}) and "
                                        f"the context ({tk}) exceeds it; patches support full-attention layers only")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pads = _left_pads(attention_mask, bsz, key.device)
    if cache is not None:
        pads = cache.map_kv_start(pads) if pads is not None else cache.kv_start
    if pads is not None and attention_mask is not None and cache is None and attention_mask.shape[1] != tk:
        raise BadInputError(f"attention mask covers {attention_mask.shape[1]} tokens but the layer sees {tk} keys; "
                            "pass a mask for every token, or use seqtool.patches.make_cache(model) for evicting methods")
    if pads is None or not bool(pads.any()):
        groups = [(torch.arange(bsz, device=key.device), 0)]
        pads_t = torch.zeros(bsz, dtype=torch.long, device=key.device)
    else:
        pads_t = pads.long()
        groups = [((pads_t == s).nonzero().flatten(), int(s)) for s in torch.unique(pads_t).tolist()]

    out = query.new_zeros(query.shape) if len(groups) > 1 or groups[0][1] else None
    for rows, start in groups:
        q_off = max(0, start - (tk - tq))
        whole = len(groups) == 1
        q_g = query[:, :, q_off:] if whole else query[rows][:, :, q_off:]
        if q_g.shape[2] == 0:
            continue
        k_g = key[:, :, start:] if whole else key[rows][:, :, start:]
        v_g = value[:, :, start:] if whole else value[rows][:, :, start:]
        call = AttnCall(q_g, k_g, v_g, scale, rt.layer_idx, rows, start, cache)
        result = _run_method(rt, call)
        if out is None:
            out = result
        else:
            out[rows, :, q_off:] = result.to(out.dtype)
        if rt.recording:
            rt.records[-1] = dataclasses.replace(rt.records[-1], query_offset=q_off, tk_cache=tk,
                                                 q=q_g if rt.capture_qk else None,
                                                 k=k_g if rt.capture_qk else None)
    if cache is not None:
        cache.after_attention(pads_t)
    return out.transpose(1, 2).contiguous(), None


def _run_method(rt: LayerRuntime, call: AttnCall) -> torch.Tensor:
    method = rt.method
    dense = method.runs_dense(call)
    if dense:
        selection = method.dense_selection(call)
    elif call.is_decode:
        selection = method.select_decode(call)
    else:
        selection = method.select(call)
    out = selection.attend(call.q, call.k, call.v, call.scale)
    context = call.tk + (call.cache.dropped(call.rows) if call.cache is not None else 0)
    rt.add_stats(selection.kept_pairs(), float(causal_pairs(call.tq, context) * call.q.shape[0] * call.q.shape[1]))
    if dense:
        rt.dense_calls += 1
    else:
        rt.sparse_calls += 1
    if rt.meter is not None:
        rt.meter.observe(rt.layer_idx, call, selection)
    if rt.recording:
        rt.records.append(CallRecord(call.rows, call.key_offset, 0, call.tq, call.tk, selection, dense, call.scale))
    return out


_REGISTERED = False


def register_attention() -> None:
    """Register ``seqtool_attention`` and its mask function with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, seqtool_attention)
    AttentionMaskInterface.register(ATTN_NAME, padding_mask_2d)
    _REGISTERED = True


def padding_mask_2d(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                    mask_function: Any = None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function for :data:`ATTN_NAME`: pass the 2D padding mask ``(B, tokens seen)`` through (None if no
    padding). The attention function derives each row's first valid key from it; causality is implicit, and
    no ``q_len x kv_len`` mask is ever built."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    return mask


# ---- handle -----------------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Measured work of one layer since the last reset: kept / causal pairs, per head and overall."""

    layer: int
    method: str
    kept_fraction: float
    head_kept_fraction: list[float]
    sparse_calls: int
    dense_calls: int


class PatchHandle:
    """A patch applied to one model. ``remove()`` (or leaving a ``with`` block) restores the model exactly."""

    def __init__(self, model: nn.Module, method: str, options: dict[str, Any], policy: Policy,
                 runtimes: dict[int, LayerRuntime], modules: dict[int, nn.Module], previous_impl: str | None):
        self.model = model
        self.method = method
        self.options = options
        self.policy = policy
        self.runtimes = runtimes
        self._modules = modules
        self._previous_impl = previous_impl
        self.active = True

    @property
    def spec(self) -> str:
        return format_attn_spec(self.method, {**self.options, **self.policy.to_dict()})

    def recipe_step(self) -> dict[str, Any]:
        return {"op": "patch", "runtime": True, "method": self.method,
                "options": {**self.options, **self.policy.to_dict()}, "spec": self.spec}

    def remove(self) -> None:
        if not self.active:
            return
        for module in self._modules.values():
            if hasattr(module, RUNTIME_ATTR):
                delattr(module, RUNTIME_ATTR)
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
        self.model.set_attn_implementation(self._previous_impl or "sdpa")
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def make_cache(self):
        return make_cache(self.model)

    def reset_stats(self) -> None:
        for rt in self.runtimes.values():
            rt.reset_stats()

    def stats(self) -> list[LayerStats]:
        out = []
        for idx, rt in sorted(self.runtimes.items()):
            if rt.kept_pairs is None:
                continue
            per_head_total = rt.total_pairs / rt.n_heads
            heads = [float(x) / per_head_total for x in rt.kept_pairs]
            out.append(LayerStats(idx, rt.method.name, float(rt.kept_pairs.sum()) / rt.total_pairs, heads,
                                  rt.sparse_calls, rt.dense_calls))
        return out

    def kept_fraction(self) -> float | None:
        """Kept / causal pairs over every layer and call since the last reset (None before any call)."""
        kept = sum(float(rt.kept_pairs.sum()) for rt in self.runtimes.values() if rt.kept_pairs is not None)
        total = sum(rt.total_pairs for rt in self.runtimes.values())
        return kept / total if total else None

    @contextlib.contextmanager
    def recording(self, capture_qk: bool = False) -> Iterator[dict[int, list[CallRecord]]]:
        """Record every call's selection per layer while inside the block (tests, reports); ``capture_qk``
        also keeps each call's (unpadded) q and k."""
        records: dict[int, list[CallRecord]] = {}
        for idx, rt in self.runtimes.items():
            rt.recording, rt.capture_qk, rt.records = True, capture_qk, []
            records[idx] = rt.records
        try:
            yield records
        finally:
            for rt in self.runtimes.values():
                rt.recording = rt.capture_qk = False


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active patch of ``model`` (None if unpatched)."""
    return getattr(model, HANDLE_ATTR, None)


def build_method(method: str, options: dict[str, Any]) -> AttentionMethod:
    cls = get_method(method)
    return cls(**coerce_options(cls, options))


def apply_patch(model: nn.Module, method: str, *, policy: Policy | None = None, **options: Any) -> PatchHandle:
    """Patch ``model``'s attention with ``method`` (a registered name) and its options; returns the handle.

    ``dense_layers`` / ``layers`` options (or ``policy``) choose the layers; everything else goes to the method
    dataclass (strings are coerced, so CLI values pass straight through). A model already patched is first
    restored. Nothing is patched until this is called.
    """
    from seqtool.arch.registry import attention_module, decoder_layers, get_family, head_counts, layer_kinds

    get_family(model)  # raises UnsupportedModelError for unknown families
    for idx, kind in enumerate(layer_kinds(model)):
        if kind.mixer != "attention" or kind.attention_experts != 1:
            raise BadInputError(f"patch works on plain attention layers; layer {idx} is '{kind.describe()}'")
    options = dict(options)
    dense_layers = _int_tuple(options.pop("dense_layers", None), "dense_layers")
    layers = options.pop("layers", None)
    layers_t = _int_tuple(layers, "layers") if layers is not None else None
    layer_options = _pop_layer_options(options)
    if policy is None:
        policy = Policy(dense_layers=dense_layers, layers=layers_t, layer_options=layer_options)
    elif dense_layers or layers_t is not None or layer_options:
        raise BadInputError("pass dense_layers/layers/layerN.* either as options or in the policy, not both")
    base = build_method(method, options)
    previous = get_handle(model)
    if previous is not None:
        previous.remove()
    if hasattr(base, "prepare"):
        base.prepare(model)  # offline searches (razor/act heads) run on the unpatched model; the recipe stores them
    stored = base.options()
    register_attention()
    n_layers = len(decoder_layers(model))
    for idx in (*policy.dense_layers, *(policy.layers or ()), *policy.layer_options):
        if not 0 <= idx < n_layers:
            raise BadInputError(f"layer {idx} out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    for idx in policy.layer_options:
        if not policy.is_patched(idx):
            raise BadInputError(f"layer {idx} has per-layer options but runs dense (dense_layers / layers)")
    n_heads, _, _ = head_counts(model.config)
    dense_cls = get_method("dense")
    runtimes: dict[int, LayerRuntime] = {}
    modules: dict[int, nn.Module] = {}
    for idx in range(n_layers):
        module = attention_module(model, idx)
        if policy.is_patched(idx):
            if idx in policy.layer_options:
                # Start from the base's prepared options so an offline search is not repeated per layer.
                layer_method = build_method(method, {**stored, **policy.layer_options[idx]})
                if hasattr(layer_method, "prepare"):
                    layer_method.prepare(model)
            else:
                layer_method = base
        else:
            layer_method = dense_cls()
        rt = LayerRuntime(idx, layer_method, n_heads)
        setattr(module, RUNTIME_ATTR, rt)
        runtimes[idx] = rt
        modules[idx] = module
    previous_impl = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:
        for module in modules.values():
            delattr(module, RUNTIME_ATTR)
        raise
    handle = PatchHandle(model, method, stored, policy, runtimes, modules, previous_impl)
    setattr(model, HANDLE_ATTR, handle)
    return handle


def apply_attn_spec(model: nn.Module, spec: str) -> PatchHandle:
    """``apply_attn_spec(model, "block_topk:budget=0.25,min_len=0")`` — the ``--attn`` form of :func:`apply_patch`."""
    method, options = parse_attn_spec(spec)
    return apply_patch(model, method, **options)


def reapply_from_recipe(model: nn.Module, recipe: list[dict[str, Any]]) -> PatchHandle | None:
    """Re-apply the last runtime ``patch`` step of a checkpoint recipe (``seqtool.load`` calls this)."""
    steps = [s for s in recipe if s.get("op") == "patch" and s.get("runtime")]
    if not steps:
        return None
    step = steps[-1]
    return apply_patch(model, step["method"], **step.get("options", {}))


def make_cache(model: nn.Module):
    """A ``DynamicCache`` for ``model`` whose layers are the patch's cache layers where its methods need one.

    Use it for every cached forward / ``generate`` of a patched model (``cache=make_cache(model)``);
    an unpatched model gets a plain ``DynamicCache``.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    handle = get_handle(model)
    if handle is None:
        return cache
    for idx, rt in handle.runtimes.items():
        layer = rt.method.make_cache_layer(rt)
        if layer is not None:
            if idx >= len(cache.layers):
                raise SeqtoolError("the model config does not describe its layers; cannot build a patch cache")
            cache.layers[idx] = layer
    return cache
