"""seqtool's own model classes, registered with ``AutoConfig`` / ``AutoModelForCausalLM`` when this package is
imported (``seqtool.arch.io.load_model`` imports it; ``import seqtool`` does not), so saved checkpoints load with
plain ``AutoModelForCausalLM.from_pretrained`` after ``import seqtool.models`` and never need ``trust_remote_code``.

- ``seqtool_bam``: :class:`~seqtool.models.bam.SeqtoolBamForCausalLM` (attention experts + FFN experts).
- ``seqtool_hybrid``: :class:`~seqtool.models.deltanet_hybrid.SeqtoolHybridForCausalLM` (attention layers and
  Gated DeltaNet mixers).
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from seqtool.models import deltanet_hybrid
from seqtool.models.bam import MODEL_TYPE as BAM_MODEL_TYPE
from seqtool.models.bam import SeqtoolBamConfig, SeqtoolBamForCausalLM
from seqtool.models.deltanet_hybrid import DeltaNetMixer, SeqtoolHybridConfig, SeqtoolHybridForCausalLM

__all__ = ["SeqtoolBamConfig", "SeqtoolBamForCausalLM", "SeqtoolHybridConfig", "SeqtoolHybridForCausalLM",
           "DeltaNetMixer", "register"]


def register() -> None:
    """Register every seqtool model class with the Auto* factories (idempotent)."""
    AutoConfig.register(BAM_MODEL_TYPE, SeqtoolBamConfig, exist_ok=True)
    AutoModelForCausalLM.register(SeqtoolBamConfig, SeqtoolBamForCausalLM, exist_ok=True)
    deltanet_hybrid.register()


register()
