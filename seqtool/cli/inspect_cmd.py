"""`seqtool inspect MODEL`: family, shapes, parameter counts, KV-cache size and recipe."""
from __future__ import annotations

import typer

from seqtool.cli.common import JsonOpt, ModelArg, check_model, emit, handle_errors, table
from seqtool.utils import format_bytes, format_count


def render(result) -> str:
    rows = [
        ("family", f"{result.family} ({result.model_class})"),
        ("layers", result.layers), ("hidden", result.hidden),
        ("heads / KV heads / head_dim", f"{result.heads} / {result.kv_heads} / {result.head_dim}"),
        ("intermediate", result.intermediate), ("vocab", result.vocab),
        ("max positions", result.max_position_embeddings),
        ("parameters (total / active)", f"{format_count(result.params_total)} / {format_count(result.params_active)}"),
        ("  attention", format_count(result.params_attention)),
        ("  MLP", format_count(result.params_mlp)),
        ("  embeddings", format_count(result.params_embeddings)),
        ("dtype", result.dtype), ("attention implementation", result.attn_implementation),
        ("KV cache per 1k tokens", format_bytes(result.kv_cache_bytes_per_1k_tokens)),
        ("seqtool operations", ", ".join(result.operations)),
    ]
    rows.insert(2, ("layer map", "\n".join(result.layer_map)))
    text = table(rows, ["property", "value"])
    if result.recipe:
        steps = "\n".join(f"  {i}. {s.get('op')} " + ", ".join(f"{k}={v}" for k, v in s.items()
                          if k not in ("op", "seqtool_version", "time")) for i, s in enumerate(result.recipe, 1))
        text += "\n\nrecipe:\n" + steps
    return text


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @handle_errors
    def inspect_command(model: ModelArg, json_out: JsonOpt = False) -> None:
        """Describe a model without loading its weights.

        Examples:
          seqtool inspect llama-3.1-8b
          seqtool inspect ./my-checkpoint --json
        """
        check_model(model)
        from seqtool.arch.inspect import inspect_model

        emit(inspect_model(model), json_out, render)
