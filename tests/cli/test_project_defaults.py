"""[tool.seqtool] in ./pyproject.toml or ./seqtool.toml: the project's model / device / dtype; explicit options win."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.cli.project import project_defaults
from seqtool.errors import BadInputError

EVAL = ["eval", "--task", "ppl", "--seq-len", "64", "--ppl-tokens", "64"]


def test_reading_the_project_file(tmp_path):
    assert project_defaults(tmp_path) == ({}, None)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n[tool.other]\nmodel = 'ref'\n")
    assert project_defaults(tmp_path) == ({}, None)
    (tmp_path / "pyproject.toml").write_text("[tool.seqtool]\nmodel = 'ref'\ndtype = 'bf16'\n")
    assert project_defaults(tmp_path) == ({"model": "ref", "dtype": "bf16"}, tmp_path / "pyproject.toml")
    (tmp_path / "seqtool.toml").write_text("model = 'tiny-llama'\n")  # seqtool.toml wins
    assert project_defaults(tmp_path)[0] == {"model": "tiny-llama"}
    (tmp_path / "seqtool.toml").write_text("model = 'tiny-llama'\nmodle = 1\n")
    with pytest.raises(BadInputError, match="unknown setting 'modle'; settings: model, device, dtype"):
        project_defaults(tmp_path)
    (tmp_path / "seqtool.toml").write_text("model = 3\n")
    with pytest.raises(BadInputError, match="'model' must be a non-empty string"):
        project_defaults(tmp_path)


def test_commands_use_the_project_model_and_explicit_options_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["inspect"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no MODEL given") and "tiny-llama" in result.stderr and "ref" in result.stderr
    assert result.stderr.count("\n") == 1
    (tmp_path / "pyproject.toml").write_text("[tool.seqtool]\nmodel = 'tiny-qwen2'\ndevice = 'cuda:7'\n")
    result = CliRunner().invoke(app, ["inspect", "--json"])
    assert result.exit_code == 0 and '"family": "qwen2"' in result.stdout
    result = CliRunner().invoke(app, ["inspect", "tiny-llama", "--json"])
    assert '"family": "llama"' in result.stdout
    result = CliRunner().invoke(app, EVAL)  # the project's device reaches the command ...
    assert result.exit_code == 2 and "cuda" in result.stderr, result.output
    result = CliRunner().invoke(app, [*EVAL, "--device", "cpu"])  # ... unless the command line sets it
    assert result.exit_code == 0, result.output
    (tmp_path / "pyproject.toml").write_text("[tool.seqtool]\nmodel = \n")
    result = CliRunner().invoke(app, ["inspect"])
    assert result.exit_code == 2 and "is not valid TOML" in result.stderr
