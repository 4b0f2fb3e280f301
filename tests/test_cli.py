"""The command line: help everywhere, the quickstart, --verify."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxlocal.cli import cli


def test_every_verb_has_help():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for verb in cli.commands:
        assert verb in top.output
        result = runner.invoke(cli, [verb, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, verb


def test_verify_passes_and_catches_a_bad_conversion(checkpoints, tmp_path):
    from mlxlocal.verify import verify_conversion

    src = checkpoints("qwen2")
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out"), "--verify"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    # Damage one tensor of the output: verification must notice.
    path = tmp_path / "out" / "model.safetensors"
    weights = mx.load(str(path))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name] * 1.5
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    report = verify_conversion(src, tmp_path / "out")
    assert not report["passed"] and report["mean_kl"] > 1e-6


@pytest.mark.parametrize("dtype", ["float16"])
def test_verify_half_precision(dtype, checkpoints, tmp_path):
    from mlxlocal import convert
    from mlxlocal.verify import verify_conversion

    convert(checkpoints("llama"), tmp_path / "out", dtype=dtype)
    report = verify_conversion(checkpoints("llama"), tmp_path / "out")
    assert report["passed"], json.dumps(report)
    assert report["dtype"] == dtype
