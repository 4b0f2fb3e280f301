"""Masked next-token cross-entropy, optionally in chunks over the sequence.

For 128k–256k vocabularies the (batch, length, vocab) logits dominate training memory. The chunked
loss runs the model body once for hidden states, then the output head and cross-entropy one slice
of positions at a time, with each slice's gradients taken on the spot, so the whole logits never
exist at once.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

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

    hidden = model.model(inputs, cache)
    return chunked_cross_entropy(model, hidden, targets, w, chunk_size), w.sum()


def chunked_cross_entropy(
    model: nn.Module, hidden: mx.array, targets: mx.array, w: mx.array, chunk_size: int
) -> mx.array:
    """Σ w·ce of the model's head over `hidden`, one slice of positions at a time.

    Each slice's gradients (for the hidden states, and for the head's weights when they train)
    are computed in the forward pass, and every slice waits for the one before, so the whole
    logits never exist; the backward pass just scales the stored gradients. The gradient of the
    cross-entropy is written out (softmax minus one-hot) rather than derived: a slice holds ~2
    logits-sized buffers instead of 4. MLX still allocates a few slices ahead of the one it
    runs, so the measured peak is about six slices' logits.
    """
    module, head = output_head(model)
    trainable = tree_flatten(module.trainable_parameters())
    names = [k for k, _ in trainable]

    def project(h, *params):
        module.update(tree_unflatten(list(zip(names, params, strict=True))))
        return head(h)

    def slice_grads(h, params, t, cw):
        logits = project(h, *params).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logits, t[..., None], axis=-1)
        loss = ((lse - picked)[..., 0] * cw).sum()
        probs = mx.exp(logits - lse)
        dlogits = mx.put_along_axis(probs, t[..., None], mx.exp(picked - lse) - 1, axis=-1)
        dlogits = dlogits * cw[..., None]
        _, grads = mx.vjp(project, [h, *params], [dlogits.astype(h.dtype)])
        return loss, grads[0], grads[1:]

    @mx.custom_function
    def fused(hidden, targets, w, *params):
        total, dh, dparams = mx.array(0.0), [], [mx.zeros_like(p) for p in params]
        for i in range(0, hidden.shape[1], chunk_size):
            part = slice(i, i + chunk_size)
            h = mx.depends(hidden[:, part], [total, dh[-1], *dparams]) if dh else hidden[:, part]
            loss, dh_part, dp = slice_grads(h, list(params), targets[:, part], w[:, part])
            total = total + loss
            dh.append(dh_part)
            dparams = [a + b for a, b in zip(dparams, dp, strict=True)]
        return (total, mx.concatenate(dh, axis=1), *dparams)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        scale = cotangents[0]
        _, dh, *dparams = outputs
        hidden, targets, w, *_ = primals
        zeros = mx.zeros_like(targets), mx.zeros_like(w)
        return (scale * dh, *zeros, *(scale * d for d in dparams))

    return fused(hidden, targets, w, *(p for _, p in trainable))[0]


def _weighted_ce(logits: mx.array, targets: mx.array, w: mx.array) -> mx.array:
    return (nn.losses.cross_entropy(logits, targets) * w).astype(mx.float32).sum()
