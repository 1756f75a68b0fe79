"""Read and rewrite attention / MLP weights in head- and channel-sized pieces, split or fused (phi3).

Conversions work on plain tensors (:class:`AttnWeights`, :class:`MlpWeights`) and write them back with
:func:`write_attention` / :func:`write_mlp`, which replace the ``nn.Linear`` modules with correctly sized ones.
:func:`set_shape` then updates the config and the per-module attributes transformers reads at forward time.
The registry's :class:`FamilySpec` says where every piece lives; nothing here tests family names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from seqtool.arch.registry import FamilySpec, decoder_layers, get_family, head_counts


@dataclass
class AttnWeights:
    """One layer's attention projections. ``q`` (Hq*D, hidden), ``k``/``v`` (Hkv*D, hidden), ``o`` (hidden, Hq*D);
    biases are (rows,) or None (``o_bias`` is (hidden,) and never sliced)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None

    def heads(self, head_dim: int) -> tuple[int, int]:
        """(query heads, KV heads) implied by the shapes."""
        return self.q.shape[0] // head_dim, self.k.shape[0] // head_dim


@dataclass
class MlpWeights:
    """One layer's gated MLP. ``gate``/``up`` (I, hidden), ``down`` (hidden, I); biases (I,) / (hidden,) or None."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def read_attention(attn: nn.Module, spec: FamilySpec, n_heads: int, head_dim: int) -> AttnWeights:
    """The projections of ``attn`` as tensors (views of the live weights; clone before editing in place)."""
    o = getattr(attn, spec.o_proj)
    if spec.fused_qkv:
        qkv = getattr(attn, spec.qkv_proj)
        w, b = qkv.weight.detach(), _bias(qkv)
        nq = n_heads * head_dim
        nkv = (w.shape[0] - nq) // 2
        cuts = [nq, nkv, nkv]
        q, k, v = torch.split(w, cuts, dim=0)
        qb, kb, vb = torch.split(b, cuts) if b is not None else (None, None, None)
    else:
        lin = [getattr(attn, name) for name in (spec.q_proj, spec.k_proj, spec.v_proj)]
        q, k, v = (m.weight.detach() for m in lin)
        qb, kb, vb = (_bias(m) for m in lin)
    return AttnWeights(q, k, v, o.weight.detach(), qb, kb, vb, _bias(o))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _cat_bias(*biases: torch.Tensor | None) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.cat([b for b in biases if b is not None])


def write_attention(attn: nn.Module, spec: FamilySpec, w: AttnWeights) -> None:
    """Replace ``attn``'s projection modules with ones holding ``w`` (shapes may differ from the old ones)."""
    if spec.fused_qkv:
        setattr(attn, spec.qkv_proj, _linear(torch.cat([w.q, w.k, w.v]), _cat_bias(w.q_bias, w.k_bias, w.v_bias)))
    else:
        setattr(attn, spec.q_proj, _linear(w.q, w.q_bias))
        setattr(attn, spec.k_proj, _linear(w.k, w.k_bias))
        setattr(attn, spec.v_proj, _linear(w.v, w.v_bias))
    setattr(attn, spec.o_proj, _linear(w.o, w.o_bias))


def read_mlp(mlp: nn.Module, spec: FamilySpec) -> MlpWeights:
    """The gated MLP of one layer as tensors; a fused ``gate_up`` holds [gate; up] rows (phi3 order)."""
    down = getattr(mlp, spec.down_proj)
    if spec.fused_gate_up:
        gu = getattr(mlp, spec.gate_up_proj)
        gate, up = gu.weight.detach().chunk(2, dim=0)
        b = _bias(gu)
        gb, ub = b.chunk(2) if b is not None else (None, None)
    else:
        g, u = getattr(mlp, spec.gate_proj), getattr(mlp, spec.up_proj)
        gate, up, gb, ub = g.weight.detach(), u.weight.detach(), _bias(g), _bias(u)
    return MlpWeights(gate, up, down.weight.detach(), gb, ub, _bias(down))


def write_mlp(mlp: nn.Module, spec: FamilySpec, w: MlpWeights) -> None:
    if spec.fused_gate_up:
        setattr(mlp, spec.gate_up_proj, _linear(torch.cat([w.gate, w.up]), _cat_bias(w.gate_bias, w.up_bias)))
    else:
        setattr(mlp, spec.gate_proj, _linear(w.gate, w.gate_bias))
        setattr(mlp, spec.up_proj, _linear(w.up, w.up_bias))
    setattr(mlp, spec.down_proj, _linear(w.down, w.down_bias))


def head_rows(index: torch.Tensor | list[int], head_dim: int) -> torch.Tensor:
    """Row indices of heads ``index`` in a (H*D, ...) projection: (len(index)*D,) long."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def set_shape(model: nn.Module, *, heads: int, kv_heads: int, head_dim: int, intermediate: int | None = None) -> None:
    """Write new head counts / intermediate size into the config (``head_dim`` always explicit, since after
    pruning heads × head_dim no longer equals hidden) and into the attributes attention modules read."""
    spec = get_family(model)
    config = model.config
    keys = spec.config_keys
    setattr(config, keys["heads"], heads)
    setattr(config, keys["kv_heads"], kv_heads)
    setattr(config, keys["head_dim"], head_dim)
    if intermediate is not None:
        setattr(config, keys["intermediate"], intermediate)
    for layer in decoder_layers(model):
        attn = getattr(layer, spec.attention)
        attn.head_dim = head_dim
        attn.num_key_value_groups = heads // kv_heads
        for name, value in (("num_key_value_heads", kv_heads), ("num_heads", heads), ("num_attention_heads", heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        mlp = getattr(layer, spec.mlp)
        if intermediate is not None and hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate


def current_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(query heads, KV heads, head_dim, intermediate) read from the live config."""
    spec = get_family(model)
    heads, kv_heads, head_dim = head_counts(model.config)
    return heads, kv_heads, head_dim, int(getattr(model.config, spec.config_keys["intermediate"]))


def attn_mlp_params(model: nn.Module) -> int:
    """Parameters in every layer's attention (or other mixer) and MLP modules (what a pruning ratio is measured
    against)."""
    spec = get_family(model)
    total = 0
    for layer in decoder_layers(model):
        for part in (spec.attention, *spec.mixers, spec.mlp):
            module = getattr(layer, part, None)  # hybrid layers hold attention or one of the mixers
            total += sum(p.numel() for p in module.parameters()) if module is not None else 0
    return total
