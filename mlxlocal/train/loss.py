"""Masked next-token cross-entropy, optionally in chunks over the sequence.

For 128k–256k vocabularies the (batch, length, vocab) logits dominate training memory. The chunked
loss runs the model body once for hidden states, then applies the output head and cross-entropy
one slice of positions at a time under `mx.checkpoint`, so only one slice of logits exists at a
time, in the forward pass and again when the backward pass recomputes it.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxLocalError
from .masks import packed_caches


def output_head(model: nn.Module) -> tuple[nn.Module, Callable[[mx.array], mx.array]]:
    """(module holding the head's weights, hidden states → logits) for mlx-lm's models.

    This is the tail of mlx-lm's `Model.__call__` after `model.model(...)`: an `lm_head`, or the
    tied embedding used as a linear layer, then Gemma 2's final logit soft-capping.
    """
    if "lm_head" in model:
        module, project = model.lm_head, model.lm_head
    else:
        module = model.model.embed_tokens
        project = module.as_linear
    cap = getattr(model, "final_logit_softcapping", None)
    if cap:
        return module, lambda h: mx.tanh(project(h) / cap) * cap
    return module, project


def check_output_head(model: nn.Module) -> None:
    """Refuse chunking for an architecture whose logits `output_head` does not reproduce."""
    probe = mx.array([[1, 2, 3, 4, 5]])
    try:
        _, head = output_head(model)
        same = mx.allclose(head(model.model(probe)), model(probe), rtol=1e-3, atol=1e-3).item()
    except (AttributeError, TypeError, ValueError):
        same = False
    if not same:
        raise MlxLocalError(
            f"training.loss_chunk_size: the chunked loss does not know how mlx-lm's "
            f"{getattr(model, 'model_type', type(model).__name__)} computes its logits; "
            "remove loss_chunk_size for this model"
        )


def loss_sums(
    model: nn.Module,
    tokens: mx.array,
    weights: mx.array,
    segments: mx.array,
    packed: bool = False,
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array]:
    """(Σ w·ce, Σ w) over a batch: inputs tokens[:, :-1], targets tokens[:, 1:].

    Sums rather than a mean, so gradient accumulation can divide by the tokens of the whole step.
    `packed` gives each packed example its own block of attention.
    """
    inputs, targets, w = tokens[:, :-1], tokens[:, 1:], weights[:, 1:]
    cache = packed_caches(model, segments[:, :-1]) if packed else None
    if chunk_size is None:
        logits = model(inputs, cache=cache)
        return _weighted_ce(logits, targets, w), w.sum()

    module, head = output_head(model)

    def chunk_loss(params, h, t, cw):
        module.update(params)
        return _weighted_ce(head(h), mx.stop_gradient(t), cw)

    chunk_loss = mx.checkpoint(chunk_loss)
    hidden = model.model(inputs, cache)
    params = module.trainable_parameters()
    total = mx.array(0.0)
    for i in range(0, inputs.shape[1], chunk_size):
        part = slice(i, i + chunk_size)
        h = mx.depends(hidden[:, part], total) if i else hidden[:, part]
        total = total + chunk_loss(params, h, targets[:, part], w[:, part])
    return total, w.sum()


def _weighted_ce(logits: mx.array, targets: mx.array, w: mx.array) -> mx.array:
    return (nn.losses.cross_entropy(logits, targets) * w).astype(mx.float32).sum()
