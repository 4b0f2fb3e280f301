"""The quickstart's path in reduced form: convert, quantize, LoRA, evaluate before and after."""

from __future__ import annotations

from click.testing import CliRunner

from mlxlocal.cli import cli
from mlxlocal.generate import generate, load_model
from mlxlocal.quickstart import run_quickstart


def test_quickstart_path_fine_tunes_and_reports_before_and_after(tmp_path, compiled):
    lines: list[str] = []
    result = run_quickstart(
        tmp_path, echo=lines.append, overrides=["training.steps=300", "eval.limit=40"], examples=2
    )
    output = "\n".join(lines)
    assert (tmp_path / "tiny-mlx" / "model.safetensors").exists()
    assert "rope_theta=50000.0" in output  # the conversion's config fix is shown
    assert result.size_after < result.size_before / 3  # 8-bit weights, fp32 source
    assert (result.adapters / "adapters.safetensors").exists()
    assert (result.run / "evaluation.json").exists()
    assert "held-out accuracy" in output and "→" in output
    assert f"mlxlocal chat {result.quantized} --adapter {result.adapters}" in output
    # The stand-in starts near chance; half the quickstart's steps already take it well above
    # (the full quickstart reaches 93% on all 100 held-out reviews).
    assert result.accuracy_before < 0.65
    assert result.accuracy_after >= 0.7 and result.accuracy_after >= result.accuracy_before + 0.15
    # The model it prints a chat command for learnt to end its turns with `<|end|>`: answers
    # stop there, and never show it.
    lm = load_model(result.quantized, result.adapters)
    answer = generate(lm, "The phone was dreadful.", max_tokens=16)
    assert answer.finish_reason == "stop" and "<|end|>" not in answer.text
    assert answer.text.strip() in ("positive", "negative"), answer.tokens


def test_quickstart_help_says_what_it_does():
    result = CliRunner().invoke(cli, ["quickstart", "--help"])
    assert result.exit_code == 0 and "stand-in" in result.output


def test_quickstart_reruns_in_the_same_workdir(tmp_path, compiled):
    """A second quickstart in the same --workdir works and keeps the first run."""
    overrides = ["training.steps=2", "training.warmup_steps=0", "eval.limit=4"]
    first = run_quickstart(tmp_path, echo=lambda _: None, overrides=overrides, examples=1)
    lines: list[str] = []
    second = run_quickstart(tmp_path, echo=lines.append, overrides=overrides, examples=1)
    assert first.run == tmp_path / "run" and second.run == tmp_path / "run-2"
    assert (first.run / "summary.json").exists() and (second.run / "summary.json").exists()
    assert any("earlier quickstart runs are kept" in line for line in lines)
    result = CliRunner().invoke(cli, ["quickstart", "--help"])
    assert "--workdir" in result.output
