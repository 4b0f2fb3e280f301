"""`quickstart`: the whole local path, offline, in a few minutes on a laptop's CPU.

A tiny stand-in base model (random weights, built here deterministically; a real model comes
from the Hub with `mlxlocal convert`) is converted to MLX, quantized, fine-tuned with LoRA on
the sentiment reviews shipped with mlxlocal, and scored on held-out reviews before and after.
The stand-in knows nothing, so the accuracy it starts from is chance: what it ends with is
what the fine-tuning taught it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .convert import convert
from .info import format_info, info
from .quantize import quantize
from .sources import builtin_model

RECIPE = "tiny-lora-sentiment"


@dataclass
class QuickstartResult:
    model: Path  # the converted MLX model
    quantized: Path
    run: Path
    adapters: Path
    accuracy_before: float
    accuracy_after: float
    size_before: int  # bytes of weights
    size_after: int

    def table(self, base: Path) -> list[str]:
        rows = [
            ("held-out accuracy", f"{self.accuracy_before:.1%} → {self.accuracy_after:.1%}"),
            ("model size", f"{_mb(self.size_before)} → {_mb(self.size_after)}"),
            ("adapters", str(self.adapters)),
            ("run directory", str(self.run)),
            ("chat with it", f"mlxlocal chat {base} --adapter {self.adapters}"),
        ]
        width = max(len(k) for k, _ in rows)
        return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _fresh_run_dir(root: Path) -> Path:
    """`run`, or `run-N` past the finished runs of earlier quickstarts in the same workdir:
    re-running never refuses and never deletes a finished run (an interrupted one resumes)."""
    path, n = root / "run", 1
    while (path / "summary.json").exists():
        n += 1
        path = root / f"run-{n}"
    return path


def _weights_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("model*.safetensors"))


def run_quickstart(
    workdir: str | Path | None = None,
    echo: Callable[[str], None] = print,
    overrides: list[str] | tuple[str, ...] = (),
    examples: int = 3,
) -> QuickstartResult:
    """Build → convert → quantize → LoRA → evaluate before/after → generate → summary.

    `overrides` are recipe settings (key.path=value) for the fine-tuning, e.g. fewer steps.
    """
    from .data import parse_row, read_rows
    from .evaluate import prompt_ids
    from .generate import generate, load_model
    from .recipe import load_recipe
    from .train.run import run_recipe

    root = Path(workdir or tempfile.mkdtemp(prefix="mlxlocal-quickstart-"))
    echo("1. the base model: builtin:tiny, a tiny random-weight Llama built by mlxlocal")
    echo("   (a stand-in for a downloaded model such as Qwen/Qwen2.5-0.5B-Instruct; offline)")
    hf_dir = builtin_model("tiny")
    mlx_dir = root / "tiny-mlx"
    echo(f"2. converting it to MLX: mlxlocal convert builtin:tiny {mlx_dir}")
    for note in convert(hf_dir, mlx_dir, force=True).notes:
        echo(f"   fixed config: {note}")
    echo("   " + format_info(info(mlx_dir)).replace("\n", "\n   "))
    base = root / "tiny-mlx-8bit"
    # 8-bit: at 64 wide the stand-in is too small to keep its quality at 4 bits.
    echo(f"3. quantizing it to 8 bits: mlxlocal quantize {mlx_dir} {base} --bits 8")
    quantize(mlx_dir, base, bits=8, group_size=64, evaluate=False, force=True)
    run_dir = _fresh_run_dir(root)
    if run_dir.name != "run":
        echo(f"   (earlier quickstart runs are kept; this one goes to {run_dir})")
    recipe = load_recipe(RECIPE, [f"model.path={base}", f"output={run_dir}", *overrides])
    echo(
        f"4. fine-tuning with LoRA on {recipe.data.train} and scoring held-out reviews before "
        f"and after: mlxlocal run {RECIPE} model.path={base}"
    )
    summary = run_recipe(recipe, echo=lambda line: echo("   " + line))
    for line in summary.lines():
        echo("   " + line)

    echo("5. a few held-out reviews, answered by the fine-tuned model (greedy):")
    lm = load_model(base, summary.adapters)
    rows, _ = read_rows(recipe.eval.data)
    for row in rows[:examples]:
        sample = parse_row(row, "completion", recipe.data)
        answer = generate(lm, prompt_ids(lm.tokenizer, sample), max_tokens=8)
        echo(f"   {sample.messages[0]['content']!r} → {answer.text.strip()!r}")

    result = QuickstartResult(
        model=mlx_dir,
        quantized=base,
        run=summary.output,
        adapters=summary.adapters,
        accuracy_before=summary.before.metrics["accuracy"],
        accuracy_after=summary.after.metrics["accuracy"],
        size_before=_weights_size(mlx_dir),
        size_after=_weights_size(base),
    )
    echo("done:")
    for line in result.table(base):
        echo(line)
    return result
