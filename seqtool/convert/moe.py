"""``convert --to moe``: upcycle dense seeds into a native Mixture-of-Experts checkpoint, streamed tensor by tensor.

Expert e of every layer's FFN is seed (e % seeds)'s MLP; every other tensor (attention, norms, embeddings) is the
mean over seeds; the router is random or initialised from the seeds' hidden states (:mod:`seqtool.convert.routing`).
The target class comes from the source family's data (``moe_target`` in its JSON: Mixtral for llama/mistral,
Qwen2-MoE with a zero shared expert for qwen2, Qwen3-MoE for qwen3) so plain ``AutoModelForCausalLM`` loads the
result. The output is planned from the seeds' headers, then written one tensor at a time
(:func:`seqtool.arch.stream.write_streaming`): memory holds a few tensors, never a model.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from seqtool.arch.registry import FamilySpec, all_families
from seqtool.arch.stream import PlannedTensor, TensorInfo, chunked_mean, validate_streamed, write_streaming
from seqtool.convert.base import Conversion, ConvertResult, ShapeSummary, register
from seqtool.convert.seeds import Seed, check_seeds, expert_plan, open_seed, parse_sources
from seqtool.errors import BadInputError

# Size of Qwen2-MoE's shared expert: the native class always has one; it is written as zeros (output 0).
SHARED_EXPERT_SIZE = 1
# Files of a seed directory that are not copied to the output (weights and config are written anew).
_NOT_COPIED = {"config.json", "README.md", "model.safetensors.index.json"}


def moe_target(spec: FamilySpec) -> FamilySpec:
    """The native MoE family a dense family upcycles into (its JSON's ``moe_target``), or a one-line error."""
    target = spec.moe_target
    if not target:
        fused = " (its MLP is a fused gate_up projection)" if spec.fused_gate_up else ""
        supported = sorted(s.family for s in all_families().values() if s.moe_target)
        raise BadInputError(f"--to moe has no native MoE class for '{spec.family}'{fused}; "
                            f"supported seed families: {', '.join(supported)}")
    return all_families()[target]


@dataclass
class MoeBuild:
    """What :func:`build_moe` wrote: the target config (a dict) and tensor counts."""

    config: dict
    family: str
    tensors: int
    bytes: int
    router: str


def target_config(seed_config: dict, spec: FamilySpec, target: FamilySpec, experts: int, top_k: int,
                  *, aux_loss_coef: float = 0.01) -> dict:
    """The MoE config: the seed's config with the target's model_type and the MoE keys set from registry data."""
    moe = target.moe
    config = {k: v for k, v in seed_config.items() if k not in ("architectures", "model_type", "_name_or_path",
                                                                "transformers_version")}
    config.update({"model_type": target.model_types[0], "architectures": [target.causal_lm_class],
                   moe.experts_key: experts, moe.top_k_key: top_k,
                   moe.intermediate_key: seed_config[spec.config_keys["intermediate"]],
                   "router_aux_loss_coef": aux_loss_coef, "output_router_logits": False})
    if moe.norm_topk_key:
        config[moe.norm_topk_key] = True  # renormalised top-k weights: identical experts == the dense MLP
    if moe.shared_intermediate_key:
        config[moe.shared_intermediate_key] = SHARED_EXPERT_SIZE
    if moe.dense_layers_key:
        config[moe.dense_layers_key] = []
    if moe.sparse_step_key:
        config[moe.sparse_step_key] = 1
    return config


def _check_biases(seed: Seed, spec: FamilySpec, target: FamilySpec) -> None:
    for name in seed.tensors.names():
        if name.endswith(".bias") and f".{spec.attention}." in name and not target.attention_bias:
            raise BadInputError(f"seed '{seed.source}' has attention biases ({name}); {target.family} has none")
        if name.endswith(".bias") and f".{spec.mlp}." in name:
            raise BadInputError(f"seed '{seed.source}' has MLP biases ({name}); {target.family} experts have none")


def plan_moe(seeds: list[Seed], spec: FamilySpec, target: FamilySpec, experts: int,
             routers: list[torch.Tensor]) -> list[PlannedTensor]:
    """Every output tensor (saved names, per-expert layout) with a callback that reads what it needs."""
    moe, first = target.moe, seeds[0]
    layers = int(first.config[spec.config_keys["layers"]])
    hidden = int(first.config[spec.config_keys["hidden"]])
    dtype = first.tensors.info(next(iter(first.tensors.names()))).dtype
    mlp_names = {}
    for i in range(layers):
        for part, saved in (("gate_proj", moe.saved_gate), ("up_proj", moe.saved_up), ("down_proj", moe.saved_down)):
            mlp_names[f"{spec.layers}.{i}.{spec.mlp}.{getattr(spec, part)}.weight"] = (i, saved)
    plan: list[PlannedTensor] = []
    for name in first.tensors.names():
        info = first.tensors.info(name)
        if name in mlp_names:
            i, saved = mlp_names[name]
            for e in range(experts):
                src = seeds[e % len(seeds)]
                out = f"{target.layers}.{i}.{moe.saved_expert.format(e=e)}.{saved}.weight"
                plan.append(PlannedTensor(out, info, lambda src=src, name=name: src.tensors.get(name)))
        else:
            plan.append(PlannedTensor(name, info, lambda name=name: chunked_mean([s.tensors.get(name) for s in seeds])))
    for i in range(layers):
        router = routers[i]
        plan.append(PlannedTensor(f"{target.layers}.{i}.{moe.saved_router}.weight", TensorInfo((experts, hidden), dtype),
                                  lambda r=router: r.to(dtype)))
        if moe.shared_expert:
            base = f"{target.layers}.{i}.{target.mlp}"
            size = SHARED_EXPERT_SIZE
            for part, shape in ((target.gate_proj, (size, hidden)), (target.up_proj, (size, hidden)),
                                (target.down_proj, (hidden, size))):
                plan.append(PlannedTensor(f"{base}.{moe.shared_expert}.{part}.weight", TensorInfo(shape, dtype),
                                          lambda shape=shape: torch.zeros(shape, dtype=dtype)))
            plan.append(PlannedTensor(f"{base}.{moe.shared_expert_gate}.weight", TensorInfo((1, hidden), dtype),
                                      lambda: torch.zeros((1, hidden), dtype=dtype)))
    return plan


def _copy_side_files(seed: Seed, dest: Path) -> None:
    """Tokenizer and generation config from the first seed."""
    if seed.path is None:
        tokenizer = seed.load().tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(dest)
        return
    for item in seed.path.iterdir():
        if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(".safetensors"):
            shutil.copy2(item, dest / item.name)


def _meta_model(config: dict, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqtool.models  # noqa: F401

    values = {k: v for k, v in config.items() if k not in ("model_type", "dtype", "torch_dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def config_summary(config: dict, dtype: torch.dtype) -> ShapeSummary:
    """The shape summary of a model with ``config`` (a dict) stored in ``dtype``, built on the meta device."""
    from seqtool.convert.base import shape_summary

    return shape_summary(_meta_model(config, dtype))


def seed_routers(seeds: list[Seed], router: str, experts: int, *, seed: int, router_data: list | None,
                 samples: int, seq_len: int) -> list[torch.Tensor]:
    """Per layer an fp32 (experts, hidden) router: random, or from each seed's mean hidden states on its data."""
    from seqtool.convert import routing

    spec = seeds[0].spec
    layers = int(seeds[0].config[spec.config_keys["layers"]])
    hidden = int(seeds[0].config[spec.config_keys["hidden"]])
    if router == "random":
        std = float(seeds[0].config.get("initializer_range") or 0.02)
        return routing.random_router(layers, experts, hidden, std=std, seed=seed)
    if router != "hidden":
        raise BadInputError(f"unknown router '{router}'; use one of {', '.join(routing.ROUTERS)}")
    from seqtool.convert import calib as calib_mod

    data = list(router_data or [])
    if data and len(data) not in (1, len(seeds)):
        raise BadInputError(f"--router-data takes one text file or one per seed ({len(seeds)}), got {len(data)}")
    means = []
    for idx, s in enumerate(seeds):
        loaded = s.load()
        path = data[idx % len(data)] if data else None
        ids = calib_mod.calibration_ids(loaded.tokenizer, path=path, samples=samples, seq_len=seq_len, seed=seed)
        means.append(routing.mean_mlp_inputs(loaded.model, ids))
    return routing.hidden_router(means, experts)


def build_moe(seeds: list[Seed], out_dir: Path, *, experts: int, top_k: int, routers: list[torch.Tensor],
              step: dict, max_shard_bytes: int = 2 * 1024**3, progress=None) -> MoeBuild:
    """Write the MoE checkpoint into ``out_dir`` (an empty directory): weights, config with recipe, tokenizer."""
    from seqtool import recipe as recipe_mod

    spec = check_seeds(seeds)
    target = moe_target(spec)
    for s in seeds:
        _check_biases(s, spec, target)
    config = target_config(seeds[0].config, spec, target, experts, top_k)
    plan = plan_moe(seeds, spec, target, experts, routers)
    write_streaming(out_dir, plan, max_shard_bytes=max_shard_bytes, progress=progress)
    steps = [*recipe_mod.read(seeds[0].config), recipe_mod.make_step(step)]
    config[recipe_mod.RECIPE_KEY] = {"version": step.get("seqtool_version") or recipe_mod._version(), "steps": steps}
    _copy_side_files(seeds[0], out_dir)
    model = _meta_model(config, plan[0].info.dtype)
    model.config.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(recipe_mod.model_card(model, steps))
    total = sum(p.info.nbytes for p in plan)
    return MoeBuild(config, target.family, len(plan), total, step.get("router", ""))


@register("moe")
@dataclass
class MoeConversion(Conversion):
    """Options of ``--to moe`` (see the module docstring). ``from_`` lists the seeds after MODEL."""

    from_: list | str | None = None
    experts: int | None = None
    top_k: int | None = None
    router: str = "random"
    router_data: list | str | None = None
    seed: int = 0

    builds: ClassVar[bool] = True

    def build(self, model: Any, *, output: str | Path | None, force: bool = False, in_place: bool = False,
              calib: str | None = None, samples: int = 16, seq_len: int = 128, dtype: str = "auto",
              device: str = "auto", progress=None, **_: Any) -> ConvertResult:
        from seqtool.arch.io import atomic_output, load_model

        started = time.perf_counter()
        if in_place:
            raise BadInputError("--to moe writes a new checkpoint; --in-place is not supported")
        sources = [model, *parse_sources(self.from_)]
        experts, top_k = expert_plan(len(sources), self.experts, self.top_k, to="moe")
        seeds = [open_seed(s) for s in sources]
        spec = check_seeds(seeds)
        moe_target(spec)  # no native MoE class for this family: fail before the router work
        router_data = parse_sources(self.router_data) or ([calib] if calib else [])
        routers = seed_routers(seeds, self.router, experts, seed=self.seed, router_data=router_data,
                               samples=samples, seq_len=seq_len)
        step = {**self.step(), "from_": [str(s.source) for s in seeds[1:]], "experts": experts, "top_k": top_k,
                "seeds": [str(s.source) for s in seeds]}
        step["router_data"] = router_data
        tmp_dir = None
        try:
            if output is None:  # in memory: build in a temp dir and load it back (a small model, presumably)
                import tempfile

                tmp_dir = Path(tempfile.mkdtemp(prefix="seqtool-moe-"))
                built = build_moe(seeds, tmp_dir, experts=experts, top_k=top_k, routers=routers, step=step,
                                  progress=progress)
                loaded = load_model(str(tmp_dir), dtype=dtype, device=device, apply_recipe=False)
                loaded.path = None
            else:  # streamed to disk; result.model stays None (load the output with seqtool.load)
                with atomic_output(output, force=force, validate=validate_streamed) as tmp:
                    built = build_moe(seeds, tmp, experts=experts, top_k=top_k, routers=routers, step=step,
                                      progress=progress)
                loaded = None
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        stored = seeds[0].tensors.info(seeds[0].tensors.names()[0]).dtype
        before, after = config_summary(seeds[0].config, stored), config_summary(built.config, stored)
        details = {"method": "moe", "target": built.family, "experts": experts, "top_k": top_k,
                   "router": self.router, "seeds": [str(s.source) for s in seeds], "bytes_written": built.bytes}
        out_path = None if output is None else str(Path(output).expanduser().resolve())
        result = ConvertResult(op="convert", method="moe", source=str(seeds[0].source), family=spec.family,
                               output=out_path, before=before, after=after,
                               removed_ratio=round(1.0 - after.params_attn_mlp / before.params_attn_mlp, 6),
                               options=dataclasses.asdict(self), details=details,
                               seconds=round(time.perf_counter() - started, 3))
        object.__setattr__(result, "_model", loaded.model if loaded else None)
        object.__setattr__(result, "_tokenizer", loaded.tokenizer if loaded else None)
        return result
