"""``convert --to bam``: upcycle dense seeds into BAM (:mod:`seqtool.models.bam`): attention experts mixed by a soft
router plus top-k FFN experts.

Expert e (attention and FFN) of every layer comes from seed (e % seeds); norms, embeddings and the LM head are the
mean over seeds. ``attention_experts="full"`` keeps each seed's q/k/v/o; ``"kv-shared"`` keeps each seed's q/o and
the mean of the seeds' k/v, so the KV cache is one expert's size. Routers are random or from the seeds' hidden
states (both routers of a layer get the same rows). With identical seeds and the sequential block the model equals
the dense seed (soft-router weights sum to 1, top-k weights are renormalised).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from seqtool.arch.registry import FamilySpec, config_value, decoder_layers, head_counts
from seqtool.convert.base import Conversion, ConvertResult, register, shape_summary
from seqtool.convert.layout import read_attention, read_mlp
from seqtool.convert.seeds import Seed, check_seeds, expert_plan, open_seed, parse_sources
from seqtool.errors import BadInputError

ATTENTION_EXPERTS = ("full", "kv-shared")


def bam_config(model, spec: FamilySpec, experts: int, top_k: int, *, kv_shared: bool, parallel: bool):
    """A :class:`SeqtoolBamConfig` with the seed's shapes (read through registry keys)."""
    from seqtool.models.bam import SeqtoolBamConfig

    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise BadInputError("--to bam supports seeds whose layers all use full attention")
    heads, kv_heads, head_dim = head_counts(config)
    return SeqtoolBamConfig(
        vocab_size=config.vocab_size, hidden_size=int(config_value(config, "hidden")),
        intermediate_size=int(config_value(config, "intermediate")),
        num_hidden_layers=int(config_value(config, "layers")), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=bool(config.tie_word_embeddings),
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        sliding_window=getattr(config, "sliding_window", None) if not layer_types else None,
        initializer_range=getattr(config, "initializer_range", 0.02),
        num_local_experts=experts, num_experts_per_tok=top_k, num_attention_experts=experts,
        attention_kv_shared=kv_shared, parallel_block=parallel, qk_norm=bool(spec.qk_norms),
        attention_bias=bool(spec.attention_bias or getattr(config, "attention_bias", False)),
    )


def _mean(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if tensors[0] is None:
        return None
    return torch.stack([t.float() for t in tensors]).mean(0)


def _query_rows(parts: list[torch.Tensor], kv_heads: int, kv_shared: bool) -> torch.Tensor:
    """Stack experts' q rows (Hq*D, ...) into BAM's head order: (expert, kv, group) or (kv, expert, group)."""
    if not kv_shared:
        return torch.cat(parts)
    per = [p.reshape(kv_heads, -1, *p.shape[1:]) for p in parts]  # (kv, group*D, ...)
    return torch.stack(per, dim=1).reshape(-1, *parts[0].shape[1:])


def _fill_attention(bam_attn, seeds_attn: list, seed_norms: list, cfg, kv_shared: bool) -> None:
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w = seeds_attn
    if any(a.o_bias is not None for a in w):
        raise BadInputError("seeds with an o_proj bias are not supported by --to bam")
    with torch.no_grad():
        bam_attn.q_proj.weight.copy_(_query_rows([a.q for a in w], kv_heads, kv_shared))
        o_cols = [a.o.t() for a in w]  # (Hq*D, hidden) per expert
        bam_attn.o_proj.weight.copy_(_query_rows(o_cols, kv_heads, kv_shared).t())
        if kv_shared:
            bam_attn.k_proj.weight.copy_(_mean([a.k for a in w]))
            bam_attn.v_proj.weight.copy_(_mean([a.v for a in w]))
        else:
            bam_attn.k_proj.weight.copy_(torch.cat([a.k for a in w]))
            bam_attn.v_proj.weight.copy_(torch.cat([a.v for a in w]))
        if cfg.attention_bias:
            bam_attn.q_proj.bias.copy_(_query_rows([a.q_bias for a in w], kv_heads, kv_shared))
            for name in ("k", "v"):
                parts = [getattr(a, f"{name}_bias") for a in w]
                value = _mean(parts) if kv_shared else torch.cat(parts)
                getattr(bam_attn, f"{name}_proj").bias.copy_(value)
        if cfg.qk_norm:
            q_rows = [qn.reshape(1, d).expand(heads, d) for qn, _ in seed_norms]
            bam_attn.q_norm.weight.copy_(_query_rows(q_rows, kv_heads, kv_shared))
            k_rows = [kn.reshape(1, d).expand(kv_heads, d) for _, kn in seed_norms]
            bam_attn.k_norm.weight.copy_(_mean(k_rows) if kv_shared else torch.cat(k_rows))


def build_bam(seeds: list[Seed], experts: int, top_k: int, routers: list[torch.Tensor], *, kv_shared: bool,
              parallel: bool):
    """The BAM model (fp32 on CPU, then cast to the first seed's stored dtype) built from loaded seeds."""
    from seqtool.arch.io import checkpoint_dtype
    from seqtool.models.bam import SeqtoolBamForCausalLM

    models = [s.load().model for s in seeds]
    spec = check_seeds(seeds)
    first = models[0]
    cfg = bam_config(first, spec, experts, top_k, kv_shared=kv_shared, parallel=parallel)
    # Keep the seed checkpoint's stored dtype (seeds are loaded in fp32 on CPU); in-memory seeds keep theirs.
    dtype = checkpoint_dtype(seeds[0].config) if seeds[0].path is not None else next(first.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bam = SeqtoolBamForCausalLM(cfg).eval()
    heads, _, head_dim = head_counts(first.config)
    seed_layers = [decoder_layers(m) for m in models]
    pick = [e % len(seeds) for e in range(experts)]
    with torch.no_grad():
        for i, layer in enumerate(bam.model.layers):
            attn = [read_attention(getattr(seed_layers[s][i], spec.attention), spec, heads, head_dim) for s in pick]
            norms = []
            for s in pick:
                seed_attn = getattr(seed_layers[s][i], spec.attention)
                norms.append(tuple(getattr(seed_attn, n).weight for n in spec.qk_norms) if spec.qk_norms else ())
            _fill_attention(layer.self_attn, attn, norms, cfg, kv_shared)
            mlps = [read_mlp(getattr(seed_layers[s][i], spec.mlp), spec) for s in pick]
            if any(m.gate_bias is not None or m.down_bias is not None for m in mlps):
                raise BadInputError("seeds with MLP biases are not supported by --to bam")
            layer.mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat([m.gate, m.up]) for m in mlps]))
            layer.mlp.experts.down_proj.copy_(torch.stack([m.down for m in mlps]))
            layer.mlp.gate.weight.copy_(routers[i])
            layer.self_attn.router.weight.copy_(routers[i])
            for name in spec.norms:
                getattr(layer, name).weight.copy_(_mean([getattr(seed_layers[s][i], name).weight for s in range(len(seeds))]))
        for ours, path in ((bam.model.embed_tokens, spec.embed), (bam.model.norm, spec.final_norm),
                           (bam.lm_head, spec.lm_head)):
            ours.weight.copy_(_mean([m.get_submodule(path).weight for m in models]))
    if cfg.tie_word_embeddings:
        bam.tie_weights()
    return bam.to(dtype)


@register("bam")
@dataclass
class BamConversion(Conversion):
    """Options of ``--to bam`` (see the module docstring)."""

    from_: list | str | None = None
    experts: int | None = None
    top_k: int | None = None
    router: str = "random"
    router_data: list | str | None = None
    attention_experts: str = "full"
    parallel: bool = False
    seed: int = 0

    builds: ClassVar[bool] = True

    def build(self, model: Any, *, output: str | Path | None, force: bool = False, in_place: bool = False,
              calib: str | None = None, samples: int = 16, seq_len: int = 128, dtype: str = "auto",
              device: str = "auto", **_: Any) -> ConvertResult:
        from seqtool.arch.io import save_model
        from seqtool.convert.moe import config_summary, seed_routers

        started = time.perf_counter()
        if self.attention_experts not in ATTENTION_EXPERTS:
            raise BadInputError(f"unknown --attention-experts '{self.attention_experts}'; "
                                f"use one of {', '.join(ATTENTION_EXPERTS)}")
        if in_place:
            raise BadInputError("--to bam writes a new checkpoint; --in-place is not supported")
        sources = [model, *parse_sources(self.from_)]
        experts, top_k = expert_plan(len(sources), self.experts, self.top_k, to="bam")
        if experts < 2:
            raise BadInputError("--to bam needs at least 2 experts (one expert is the dense model)")
        if output is not None:
            from seqtool.arch.io import prepare_output

            prepare_output(output, force=force)  # fail before any work
        seeds = [open_seed(s) for s in sources]
        spec = check_seeds(seeds)
        router_data = parse_sources(self.router_data) or ([calib] if calib else [])
        routers = seed_routers(seeds, self.router, experts, seed=self.seed, router_data=router_data,
                               samples=samples, seq_len=seq_len)
        bam = build_bam(seeds, experts, top_k, routers, kv_shared=self.attention_experts == "kv-shared",
                        parallel=self.parallel)
        before = config_summary(seeds[0].config, bam.dtype)  # the seed as stored (seeds are loaded in fp32)
        after = shape_summary(bam)
        step = {**self.step(), "experts": experts, "top_k": top_k, "seeds": [str(s.source) for s in seeds]}
        out_path = None
        first = seeds[0].load()
        from seqtool import recipe as recipe_mod

        recipe_mod.write(bam.config, recipe_mod.read(first.model.config))
        if output is not None:
            out_path = save_model(bam, first.tokenizer, output, step=step, force=force, source_dir=seeds[0].path)
        details = {"method": "bam", "target": "seqtool_bam", "experts": experts, "top_k": top_k,
                   "attention_experts": self.attention_experts, "parallel": self.parallel, "router": self.router,
                   "seeds": [str(s.source) for s in seeds]}
        result = ConvertResult(op="convert", method="bam", source=str(seeds[0].source), family=spec.family,
                               output=str(out_path) if out_path else None, before=before, after=after,
                               removed_ratio=round(1.0 - after.params_attn_mlp / before.params_attn_mlp, 6),
                               options=dataclasses.asdict(self), details=details,
                               seconds=round(time.perf_counter() - started, 3))
        object.__setattr__(result, "_model", bam)
        object.__setattr__(result, "_tokenizer", first.tokenizer)
        return result
