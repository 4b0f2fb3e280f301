"""Attention masks for packed rows, handed to mlx-lm's models without touching their code.

mlx-lm's models take no mask argument, but `create_attention_mask(h, cache)` asks the cache for
its mask when the cache has `make_mask`. A training "cache" that stores nothing and answers with
the block-diagonal causal mask of a row's segments makes every architecture pack-aware. Positions
keep counting across segments: RoPE depends only on relative positions, so each example still
sees exactly the positions it would see alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class PackedAttention:
    """A cache-like object: offset 0, keys and values passed through, a per-segment mask."""

    offset = 0

    def __init__(self, segments: mx.array, grouped_scores: bool = False):
        self.segments = segments  # (B, L): 1..k numbers the examples in a row, 0 is padding
        self.grouped_scores = grouped_scores

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(
        self, n: int, return_array: bool = False, window_size: int | None = None
    ) -> mx.array:
        """(B, 1, L, L) bool: causal and within one segment (padding attends to padding)."""
        s = self.segments
        pos = mx.arange(n)
        mask = (s[:, :, None] == s[:, None, :]) & (pos[:, None] >= pos[None])
        if window_size is not None:
            mask = mask & (pos[:, None] < pos[None] + window_size)
        mask = mask[:, None]
        # mlx-lm's Gemma 2 applies the mask to grouped-query scores (B, kv, repeats, L, L).
        return mask[:, None] if self.grouped_scores else mask


def packed_caches(model: nn.Module, segments: mx.array) -> list[PackedAttention]:
    """One mask-giving cache per layer, for `model(inputs, cache=...)`."""
    attn = getattr(model.layers[0], "self_attn", None)
    grouped = getattr(model, "model_type", "") == "gemma2" and getattr(attn, "repeats", 1) > 1
    return [PackedAttention(segments, grouped)] * len(model.layers)
