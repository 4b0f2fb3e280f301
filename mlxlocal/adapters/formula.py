"""The LoRA/DoRA formulas, written once: the scale, PEFT's alpha, and the fused weight."""

from __future__ import annotations

import math

import mlx.core as mx

from ..errors import MlxLocalError


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (stable updates at high rank)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_alpha(scale: float, rank: int, rslora: bool) -> float:
    """PEFT's lora_alpha for a scale: the inverse of `lora_scale`."""
    return scale * (math.sqrt(rank) if rslora else rank)


def fuse(
    weight: mx.array,
    lora_a: mx.array,
    lora_b: mx.array,
    scale: float,
    magnitude: mx.array | None = None,
) -> mx.array:
    """The adapted (out, in) weight in float32: W + scale · bᵀaᵀ, DoRA rows rescaled to m."""
    w = weight.astype(mx.float32)
    a, b = lora_a.astype(mx.float32), lora_b.astype(mx.float32)
    if a.shape[0] != w.shape[1] or b.shape[1] != w.shape[0]:
        raise MlxLocalError(
            f"adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit a weight of shape "
            f"{tuple(w.shape)}; was the adapter trained on this model?"
        )
    w = w + (scale * b.T) @ a.T
    if magnitude is not None:
        norm = mx.linalg.norm(w, axis=1)
        w = (magnitude.astype(mx.float32) / norm)[:, None] * w
    return w
