"""seqtool's own model classes (hybrid mixers), registered with transformers' Auto* classes on import.

Importing this package (or calling :func:`register`, which ``seqtool.load`` and every checkpoint load do) makes
``AutoModelForCausalLM.from_pretrained`` load them without ``trust_remote_code``; ``import seqtool`` alone does not.
"""
from __future__ import annotations

from seqtool.models.deltanet_hybrid import (MODEL_TYPE, DeltaNetMixer, SeqtoolHybridConfig, SeqtoolHybridForCausalLM,
                                            register)

__all__ = ["MODEL_TYPE", "DeltaNetMixer", "SeqtoolHybridConfig", "SeqtoolHybridForCausalLM", "register"]

register()
