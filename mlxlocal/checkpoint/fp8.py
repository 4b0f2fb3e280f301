"""FP8 checkpoints dequantized to floats with their scales.

Two layouts ship. Block scales (transformers' finegrained_fp8: DeepSeek-V3, Qwen3-FP8): beside
each F8_E4M3 `X.weight` a float `X.weight_scale_inv` holds one factor per block of
`quantization_config.weight_block_size` (128×128 by default). Per-tensor or per-channel scales
(compressed-tensors, fbgemm_fp8): `X.weight_scale` holds one factor, or one per output row. In
both the float weight is the FP8 value times its factor. Activation scales (`X.input_scale`,
`X.input_scale_ub`) mean nothing once the weights are floats, so they are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx

from ..errors import MlxLocalError

_SCALES = ("weight_scale_inv", "weight_scale")
_ACTIVATION_SCALES = ("input_scale", "input_scale_ub")


def fp8_scales(
    dtypes: Mapping[str, str],
    shapes: Mapping[str, Sequence[int]],
    config: Mapping[str, Any],
) -> dict[str, str]:
    """FP8 weight name → the name of its scale tensor, for every FP8 tensor of a checkpoint.

    Read from the headers before any output exists: an F8_E4M3 tensor without a scale beside it,
    or with a scale whose shape fits neither layout, cannot be dequantized and is refused.
    """
    block = _block_size(config)
    found = {}
    for name, dtype in dtypes.items():
        if dtype != "F8_E4M3":
            continue
        module, _, leaf = name.rpartition(".")
        scale = next((f"{module}.{s}" for s in _SCALES if f"{module}.{s}" in shapes), None)
        if leaf != "weight" or scale is None:
            raise MlxLocalError(
                f"tensor {name!r} is {dtype} with no weight_scale_inv or weight_scale beside it, "
                "so its float values cannot be recovered; convert a bfloat16 release instead"
            )
        wanted = _scale_shapes(tuple(shapes[name]), block, scale.endswith("_inv"))
        if tuple(shapes[scale]) not in wanted:
            raise MlxLocalError(
                f"tensor {scale!r} has shape {tuple(shapes[scale])}, which fits no FP8 scale "
                f"layout for {name!r} of shape {tuple(shapes[name])}; re-download the checkpoint"
            )
        found[name] = scale
    return found


def _block_size(config: Mapping[str, Any]) -> tuple[int, int]:
    quant = config.get("quantization_config")
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if block is None:
        return (128, 128)
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise MlxLocalError(
            f"config.json: quantization_config.weight_block_size is {str(block)[:40]!r}, not "
            "two positive integers like [128, 128]; fix the config or re-download the checkpoint"
        )
    return tuple(block)


def _scale_shapes(
    shape: tuple[int, ...], block: tuple[int, int], inverse: bool
) -> set[tuple[int, ...]]:
    if len(shape) != 2:
        return {(), (1,)}
    m, n = shape
    if inverse:  # block scales
        return {(math.ceil(m / block[0]), math.ceil(n / block[1]))}
    return {(), (1,), (m,), (m, 1)}


def dequantize_fp8(
    weights: dict[str, mx.array], scales: Mapping[str, str], config: Mapping[str, Any]
) -> dict[str, mx.array]:
    """`weights` with each FP8 weight (decoded to floats by the reader) times its scale, lazily;
    the scale and activation-scale tensors removed."""
    bm, bn = _block_size(config)
    out = dict(weights)
    for name, scale_name in scales.items():
        weight = out[name].astype(mx.float32)
        scale = out.pop(scale_name).astype(mx.float32)
        if scale.ndim == 2 and scale_name.endswith("_inv"):
            m, n = weight.shape
            scale = mx.repeat(mx.repeat(scale, bm, axis=0), bn, axis=1)[:m, :n]
        elif scale.ndim == 1 and scale.size == weight.shape[0] and weight.ndim == 2:
            scale = scale[:, None]
        out[name] = weight * scale
        module = name.rpartition(".")[0]
        for leaf in _ACTIVATION_SCALES:
            out.pop(f"{module}.{leaf}", None)
    return out
