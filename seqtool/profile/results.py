"""Result dataclasses of ``seqtool profile`` (plain data: ``dataclasses.asdict`` gives the JSON)."""
from __future__ import annotations

from dataclasses import dataclass, field

# Row status values.
OK, OOM, SKIPPED, ERROR = "ok", "oom", "skipped", "error"


@dataclass
class LengthResult:
    """Measurements at one sequence length. Times in seconds, sizes in bytes; ``None`` = not measured."""

    seq_len: int
    batch: int
    status: str = OK
    note: str = ""
    prefill_median_s: float | None = None
    prefill_p90_s: float | None = None
    prefill_samples_s: list[float] = field(default_factory=list)
    ttft_s: float | None = None
    decode_tokens: int = 0
    decode_s_per_token: float | None = None
    decode_tokens_per_s: float | None = None
    # CUDA: max allocated (absolute) / max reserved; CPU: peak RSS increase over the loaded model.
    peak_memory_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_increase_bytes: int | None = None
    memory_method: str = ""
    kv_cache_bytes: int | None = None  # measured after prefill (seq_len tokens)
    kv_cache_bytes_final: int | None = None  # measured after decoding
    kv_cache_bytes_dense: int | None = None  # analytic dense cache for seq_len tokens, for reference
    prefill_flops: int | None = None
    prefill_tflops: float | None = None
    estimated_memory_bytes: int | None = None
    estimated_seconds: float | None = None  # from FLOPs and a measured matmul rate (see profile.estimate)
    available_memory_bytes: int | None = None
    breakdown_s: dict[str, float] | None = None
    # MoE / BAM: per router, each expert's share of a prefill's routing and imbalance = experts × max share
    routing: list[dict] | None = None


@dataclass
class ModelProfile:
    """One model's rows plus what it is."""

    source: str
    family: str
    params: int
    weight_bytes: int
    dtype: str
    device: str
    attn: str
    rows: list[LengthResult] = field(default_factory=list)


@dataclass
class Environment:
    device_type: str
    device_name: str
    torch_version: str
    transformers_version: str
    seqtool_version: str
    python_version: str
    platform: str
    threads: int
    cuda_version: str | None = None


@dataclass
class ComparisonRow:
    """``other / base`` ratios at one length (None where either side has no number)."""

    seq_len: int
    prefill_ratio: float | None
    ttft_ratio: float | None
    decode_ratio: float | None
    peak_memory_ratio: float | None
    kv_cache_ratio: float | None


@dataclass
class ProfileReport:
    models: list[ModelProfile]
    environment: Environment
    settings: dict
    comparison: list[ComparisonRow] | None = None
