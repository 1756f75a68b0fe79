"""The `seqtool` command: one Typer app, one module per command."""
from __future__ import annotations

import typer

from seqtool.version import __version__
from seqtool.cli import common
from seqtool.cli import eval_cmd, inspect_cmd, zoo_cmd
from seqtool.cli import profile_cmd
from seqtool.cli import convert_cmd, prune_cmd
from seqtool.cli import patch_cmd
from seqtool.cli import finetune_cmd
from seqtool.cli import run_cmd

app = typer.Typer(
    name="seqtool",
    help="Rewrite Hugging Face causal LMs into cheaper long-context models and measure what it cost and saved.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=common.OneLineErrorsGroup,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def root(
    quiet: common.QuietOpt = False,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """seqtool: sparse attention patches, GQA/MoE/hybrid conversion, pruning, profiling and evaluation."""
    common.set_quiet(quiet)
    common.quiet_libraries()


for _module in (inspect_cmd, profile_cmd, eval_cmd, zoo_cmd, convert_cmd, prune_cmd, patch_cmd, finetune_cmd, run_cmd):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    common.quiet_libraries()
    app()
