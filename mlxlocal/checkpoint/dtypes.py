"""The float dtypes a checkpoint's weights may be stored and computed in, by their config names,
and which one `auto` computes in on this machine."""

from __future__ import annotations

import mlx.core as mx

from ..errors import MlxLocalError

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def check_dtype(dtype: str | None) -> None:
    """Refuse a dtype name outside `DTYPES` before any work starts (None: keep the source's)."""
    if dtype is not None and dtype not in DTYPES:
        raise MlxLocalError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def compute_dtype(name: str) -> str:
    """`auto`: float32 on MLX's CPU back end (the fast dtype there), bfloat16 on Metal/CUDA."""
    if name != "auto":
        return name
    gpu = mx.metal.is_available() or mx.cuda.is_available()
    return "bfloat16" if gpu else "float32"
