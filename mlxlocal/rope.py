"""Rotary embeddings where mlx-lm's differ from transformers' (the reference); see
models.own_rope, which puts them into mlx-lm's models."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


class LongRoPE(nn.Module):
    """LongRoPE (Phi-3 `longrope`/`su`) as transformers computes it: the short factors while
    offset + length stay within original_max_position_embeddings, the long ones past it, and
    the attention factor (`attention_factor`, else mlx-lm's sqrt(1 + ln(max/original) /
    ln(original)), the same as transformers') either way. `rope` is mlx-lm's SuScaledRoPE."""

    def __init__(self, rope: nn.Module, config: dict[str, Any]):
        super().__init__()
        scaling = config["rope_scaling"]
        self.dim = rope.dim
        self.original = rope.original_max_position_embeddings
        base = config.get("rope_theta", 10000.0)
        periods = base ** (mx.arange(0, self.dim, 2, dtype=mx.float32) / self.dim)
        self._short = mx.array(scaling["short_factor"], dtype=mx.float32) * periods
        self._long = mx.array(scaling["long_factor"], dtype=mx.float32) * periods
        self._scale = scaling.get("attention_factor") or rope._scale

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        last = offset if isinstance(offset, int) else int(mx.max(offset).item())
        freqs = self._long if last + x.shape[-2] > self.original else self._short
        return mx.fast.rope(
            x.at[..., : self.dim].multiply(self._scale),
            self.dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=freqs,
        )
