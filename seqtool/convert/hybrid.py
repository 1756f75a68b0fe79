"""``convert --to hybrid``: keep a few softmax-attention layers, replace the others by recurrent mixers.

    seqtool.convert("ref", to="hybrid", mixer="mamba2", keep_attention=0.5, output="ref-hybrid")

Mixers: ``mamba2`` writes the native transformers ``GraniteMoeHybridForCausalLM`` (plain ``AutoModelForCausalLM``
loads it without seqtool), initialised from the attention weights as in Mamba-in-the-Llama
(:mod:`seqtool.convert.hybrid_native`). Which layers stay attention: :mod:`seqtool.convert.hybrid_layers`.
The hybrid is then distilled from the original in two stages on the training engine
(:mod:`seqtool.convert.hybrid_distill`: attention transfer on the mixers, then KL with LoRA on the rest;
``steps1=0, steps2=0`` keeps the initialisation).
``deltanet`` (Gated DeltaNet) and ``linear`` (LoLCATs: Hedgehog linear attention + a softmax window) write
seqtool's own ``SeqtoolHybridForCausalLM`` (:mod:`seqtool.models`, :mod:`seqtool.convert.hybrid_seqtool`).

Exact case: listing every layer as attention gives the source model's logits exactly (after save + plain reload).
The source model passed in memory is not modified; ``result.model`` is the new hybrid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from seqtool.arch.registry import decoder_layers
from seqtool.convert.base import Conversion, register
from seqtool.convert.hybrid_layers import LayerChoice, choose_layers, count_for_fraction, parse_layers
from seqtool.errors import BadInputError

MIXERS = ("mamba2", "linear", "deltanet")
INITS = ("attention", "random")
DEFAULT_STEPS1 = 60
DEFAULT_STEPS2 = 300
# per-mixer stage-2 defaults (the recipes behind docs/hybrid.md's rows): linear needs more steps at 2048 tokens
# linear needs the longer 2048-token phase (docs/hybrid.md: linear at 1/4 of 150 steps: 3.5x ppl)
MIXER_DEFAULTS = {"linear": {"long_frac": 0.5}}
DEFAULT_SEQ_LEN = 512
_RUN_ONLY = ("run_dir", "resume", "progress")  # how to run, not what is computed: kept out of the recipe
NATIVE_MIXERS = ("mamba2",)


@register("hybrid")
@dataclass
class HybridConversion(Conversion):
    """Options: ``mixer`` (mamba2|linear|deltanet), ``attention_layers`` (indices kept as attention, e.g. "0,3")
    or ``keep_attention`` (fraction of layers kept, ranked by retrieval score; default 0.25), ``seed`` (mixer init,
    LoRA init, data order), ``window`` (``linear``: softmax window, tokens), ``init`` (``attention``: the
    mixers' projections start from the attention weights; ``random``: they start random, an ablation); distillation: ``steps1``/``steps2`` (0 skips a stage), ``lora_r``, ``train_seq_len``,
    ``batch``, ``lr1``/``lr2``, ``data`` (None: built-in corpus), ``eval_rows`` (held-out rows for the before/after
    loss), ``run_dir`` (checkpoints; needed for ``resume``), ``progress``."""

    mixer: str = "mamba2"
    attention_layers: Any = None
    keep_attention: float | None = None
    seed: int = 0
    window: int = 64
    init: str = "attention"
    # distillation (seqtool.convert.hybrid_distill); steps 0 skips a stage, both 0 = initialisation only
    steps1: int = DEFAULT_STEPS1
    steps2: int | None = None  # None: DEFAULT_STEPS2, or the mixer's MIXER_DEFAULTS
    lora_r: int = 8
    train_seq_len: int = DEFAULT_SEQ_LEN
    batch: int = 8
    lr1: float = 1e-3
    lr2: float = 1e-3
    data: str | None = None
    mix_retrieval: float = 0.3
    long_frac: float | None = None  # None: 0.25, or the mixer's MIXER_DEFAULTS
    long_seq_len: int = 2048
    long_batch: int = 2
    bf16: str = "on"
    eval_rows: int = 32
    run_dir: str | None = None
    resume: bool = False
    progress: str = "auto"

    def __post_init__(self) -> None:
        defaults = {"steps2": DEFAULT_STEPS2, "long_frac": 0.25, **MIXER_DEFAULTS.get(self.mixer, {})}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.attention_layers = parse_layers(self.attention_layers)
        self._choice: LayerChoice | None = None
        self._result: nn.Module | None = None

    def check(self, model: nn.Module) -> None:
        if self.mixer not in MIXERS:
            raise BadInputError(f"unknown mixer '{self.mixer}'; use one of {', '.join(MIXERS)}")
        n_layers = len(decoder_layers(model))
        if self.attention_layers is not None and self.keep_attention is not None:
            raise BadInputError("pass either --attention-layers or --keep-attention, not both")
        if self.attention_layers is not None:
            bad = [i for i in self.attention_layers if not 0 <= i < n_layers]
            if bad:
                raise BadInputError(f"attention layer {bad[0]} out of range: the model has {n_layers} layers "
                                    f"(0-{n_layers - 1})")
            n_keep = len(self.attention_layers)
        elif self.keep_attention is not None:
            if not 0.0 <= float(self.keep_attention) <= 1.0:
                raise BadInputError(f"--keep-attention must be in [0, 1], got {self.keep_attention}")
            n_keep = count_for_fraction(float(self.keep_attention), n_layers)
        else:
            n_keep = 1
        self._distill_config().check()
        if self.init not in INITS:
            raise BadInputError(f"unknown init '{self.init}'; use {' or '.join(INITS)}")
        if self.window < 1:
            raise BadInputError(f"the linear mixer's window must be at least 1 token, got {self.window}")
        if self.mixer in NATIVE_MIXERS and n_keep == 0:
            raise BadInputError("--mixer mamba2 needs at least one attention layer (the native "
                                "GraniteMoeHybrid class needs one for cached generate)")
        from seqtool.convert.hybrid_native import check_native

        check_native(model, self.mixer)

    def apply(self, model: nn.Module, calib_ids: torch.Tensor | None) -> dict:
        from seqtool.convert.hybrid_native import build_native_hybrid

        n_layers = len(decoder_layers(model))
        self._choice = choose_layers(model, n_layers, attention_layers=self.attention_layers,
                                     keep_attention=self.keep_attention, tokenizer=self.tokenizer,
                                     seed=self.seed)
        kept = self._choice.attention_layers
        if self.mixer in NATIVE_MIXERS:
            hybrid = build_native_hybrid(model, kept, seed=self.seed)
        else:
            from seqtool.convert.hybrid_seqtool import build_seqtool_hybrid

            hybrid = build_seqtool_hybrid(model, kept, mixer=self.mixer, seed=self.seed, window=self.window)
        if self.init == "random":
            randomize_mixer_projections(hybrid, seed=self.seed)
        stages = []
        if self.steps1 or self.steps2:
            from seqtool.convert.hybrid_distill import distill

            if self.tokenizer is None:
                raise BadInputError("hybrid distillation needs a tokenizer; pass tokenizer= with a bare model")
            hybrid, stages = distill(hybrid, model, self.tokenizer, self._distill_config(), run_dir=self.run_dir,
                                     resume=self.resume, progress=self.progress,
                                     identity={"attention_layers": kept, "mixer": self.mixer})
        self._result = hybrid
        return {
            "stages": [dataclasses.asdict(s) for s in stages],
            "method": f"hybrid-{self.mixer}",
            "mixer": self.mixer,
            "attention_layers_kept": kept,
            "converted_layers": [i for i in range(n_layers) if i not in kept],
            "layer_choice": self._choice.reason,
            "retrieval_scores": self._choice.scores,
            "model_class": type(self._result).__name__,
        }

    def _distill_config(self):
        from seqtool.convert.hybrid_distill import DistillConfig

        return DistillConfig(steps1=self.steps1, steps2=self.steps2, lora_r=self.lora_r, seq_len=self.train_seq_len,
                             batch=self.batch, lr1=self.lr1, lr2=self.lr2, data=self.data, seed=self.seed,
                             mix_retrieval=self.mix_retrieval, long_frac=self.long_frac,
                             long_seq_len=self.long_seq_len, long_batch=self.long_batch, bf16=self.bf16,
                             eval_rows=self.eval_rows)

    def result_model(self, model: nn.Module) -> nn.Module:
        return self._result if self._result is not None else model

    def step(self) -> dict:
        step = {k: v for k, v in super().step().items() if k not in _RUN_ONLY}
        if self._choice is not None:
            step["attention_layers_kept"] = self._choice.attention_layers
        return step

    @property
    def choice(self) -> LayerChoice | None:
        """The layer choice made by :meth:`apply` (None before)."""
        return self._choice


@torch.no_grad()
def randomize_mixer_projections(hybrid: nn.Module, *, seed: int = 0) -> None:
    """The ``init="random"`` ablation: the projections read from the attention weights (``q/k/v/o_proj``;
    Mamba2's ``in_proj`` / ``out_proj``) get PyTorch's default random init (seeded); gates, decays, convs and
    feature maps keep their initialisation."""
    from seqtool.convert.hybrid_distill import mixer_module_names

    torch.manual_seed(seed + 7)
    for name in mixer_module_names(hybrid):
        for sub, module in hybrid.get_submodule(name).named_modules():
            if isinstance(module, nn.Linear) and sub in _FROM_ATTENTION:
                module.reset_parameters()


_FROM_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj")
