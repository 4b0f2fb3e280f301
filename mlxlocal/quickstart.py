"""`quickstart`: the whole local path on a tiny stand-in model, offline, in seconds.

The model is random-weight and built here (see `tiny.py`); it shows the machinery, not quality.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from .convert import convert
from .info import format_info, info
from .models import load
from .tiny import build_tiny_checkpoint


def run_quickstart(workdir: str | Path | None = None, echo: Callable[[str], None] = print) -> Path:
    """Build → convert → info → greedy generation; returns the converted model's folder."""
    from mlx_lm import generate

    root = Path(workdir or tempfile.mkdtemp(prefix="mlxlocal-quickstart-"))
    hf_dir = root / "tiny-hf"
    if not (hf_dir / "config.json").exists():
        echo(f"1. building a tiny random-weight stand-in model (Hugging Face format) in {hf_dir}")
        build_tiny_checkpoint(hf_dir)
    mlx_dir = root / "tiny-mlx"
    echo(f"2. converting it to MLX: mlxlocal convert {hf_dir} {mlx_dir}")
    result = convert(hf_dir, mlx_dir, force=True)
    for note in result.notes:
        echo(f"   fixed config: {note}")
    echo(f"3. describing it: mlxlocal info {mlx_dir}")
    echo("   " + format_info(info(mlx_dir)).replace("\n", "\n   "))
    echo("4. greedy generation (random weights, so expect gibberish):")
    model, tokenizer = load(mlx_dir)
    text = generate(model, tokenizer, "The quick brown fox", max_tokens=16, verbose=False)
    echo(f"   The quick brown fox{text}")
    echo(f"done: the MLX model is in {mlx_dir}")
    return mlx_dir
