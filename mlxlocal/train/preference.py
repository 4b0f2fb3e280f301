"""Preference objectives: DPO, ORPO and SimPO over pairs of answers to one prompt.

A batch holds B pairs as 2B rows (every chosen answer, then every rejected one), so both sides
of a pair are scored in the same forward pass. Each side's score is the sum (DPO) or mean (ORPO,
SimPO) of its answer tokens' log-probabilities. The formulas and the logged rewards are TRL's
(DPO `loss_type="sigmoid"`, plus cDPO's label smoothing; ORPO; CPO's `simpo` with
`cpo_alpha=0`), checked against TRL in tests/test_preference.py.

DPO's reference is the base model: its log-probabilities of every pair are computed once, before
any adapter exists or any weight moves (so full fine-tuning needs no second copy either), and
cached in the run directory, where a resumed run finds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..data import Pair, collate_pairs

METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
REFERENCE_FILE = "reference.npz"


@dataclass(frozen=True)
class Objective:
    name: str  # dpo | orpo | simpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @classmethod
    def of(cls, method: Any) -> Objective | None:
        """The recipe method's preference objective, or None for sft."""
        if method.objective == "sft":
            return None
        return cls(method.objective, method.beta, method.label_smoothing, method.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"


def token_logps(model: nn.Module, tokens: mx.array) -> mx.array:
    """log p of every next token, (B, L-1) float32.

    Rows are padded on the right, so padding never changes a real token's log-probability.
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)
    return -nn.losses.cross_entropy(logits, tokens[:, 1:])


def sequence_logps(model: nn.Module, tokens: mx.array, weights: mx.array) -> tuple[mx.array, ...]:
    """(Σ log p, number of answer tokens) of each row's weighted targets, float32."""
    w = weights[:, 1:]
    return (token_logps(model, tokens) * w).sum(axis=-1), w.sum(axis=-1)


def _smoothed(z: mx.array, label_smoothing: float) -> mx.array:
    """-(1-ε)·log σ(z) - ε·log σ(-z), per pair."""
    loss = -(1 - label_smoothing) * nn.log_sigmoid(z)
    return loss - label_smoothing * nn.log_sigmoid(-z) if label_smoothing else loss


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return mx.where(x > -0.6931472, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def pair_losses(
    objective: Objective,
    logps: mx.array,
    counts: mx.array,
    reference: mx.array,
    nll: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """(loss of the batch × pairs, chosen rewards, rejected rewards) from 2B rows' scores.

    The first value is a sum over pairs (so micro-batches add up). ORPO adds `nll`, the mean
    next-token loss over the chosen rows' every token (prompt included, as TRL's ORPO does),
    times B.
    """
    o, b = objective, logps.shape[0] // 2
    if o.name == "dpo":
        ratios = logps - reference
        chosen, rejected = o.beta * ratios[:b], o.beta * ratios[b:]
        return _smoothed(chosen - rejected, o.label_smoothing).sum(), chosen, rejected
    mean = logps / mx.maximum(counts, 1)
    chosen, rejected = o.beta * mean[:b], o.beta * mean[b:]
    if o.name == "simpo":
        z = o.beta * (mean[:b] - mean[b:] - o.simpo_gamma / o.beta)
        return _smoothed(z, o.label_smoothing).sum(), chosen, rejected
    # ORPO: NLL of the chosen answers minus β·log σ(log odds ratio).
    odds = (mean[:b] - mean[b:]) - (_log1mexp(mean[:b]) - _log1mexp(mean[b:]))
    return b * nll - (o.beta * nn.log_sigmoid(odds)).sum(), chosen, rejected


def batch_loss(
    model: nn.Module,
    objective: Objective,
    tokens: mx.array,
    weights: mx.array,
    segments: mx.array,
    reference: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """(loss sum, pairs, metric sums in METRICS order) of one batch of pairs."""
    per_token = token_logps(model, tokens)
    w = weights[:, 1:]
    logps, counts = (per_token * w).sum(axis=-1), w.sum(axis=-1)
    nll = None
    if objective.name == "orpo":
        b = tokens.shape[0] // 2
        real = (segments[:b, 1:] > 0).astype(mx.float32)
        nll = -(per_token[:b] * real).sum() / mx.maximum(real.sum(), 1)
    loss, chosen, rejected = pair_losses(objective, logps, counts, reference, nll)
    chosen, rejected = mx.stop_gradient(chosen), mx.stop_gradient(rejected)
    margin = chosen - rejected
    sums = mx.stack([chosen.sum(), rejected.sum(), margin.sum(), (margin > 0).sum()])
    return loss, mx.array(chosen.shape[0], mx.float32), sums.astype(mx.float32)


def metrics_record(sums: mx.array, pairs: float, prefix: str = "") -> dict[str, float]:
    """Mean rewards, margin and accuracy per pair, named for metrics.jsonl."""
    values = np.array(sums) / max(pairs, 1.0)
    return {prefix + name: float(v) for name, v in zip(METRICS, values, strict=True)}


# --- the reference model's scores ---------------------------------------------------------------


def fingerprint(pairs: list[Pair]) -> str:
    """A hash of every pair's tokens and weights: a cache made for other data is not used."""
    h = hashlib.sha256()
    for p in pairs:
        for e in (p.chosen, p.rejected):
            h.update(np.asarray(e.tokens, np.int64).tobytes())
            h.update(np.asarray(e.weights, np.int8).tobytes())
    return h.hexdigest()


def reference_logps(
    model: nn.Module, pairs: list[Pair], batch_size: int, max_length: int
) -> np.ndarray:
    """(N, 2) summed log-probabilities of each pair's chosen and rejected answer."""
    out = np.zeros((len(pairs), 2), np.float32)
    for start in range(0, len(pairs), batch_size):
        index = list(range(start, min(start + batch_size, len(pairs))))
        b = collate_pairs([pairs[i] for i in index], index, max_length)
        logps, _ = sequence_logps(model, b.tokens, b.weights)
        mx.eval(logps)
        out[index] = np.array(logps).reshape(2, -1).T
    return out


def cached_reference(
    run_dir: Path, name: str, model: nn.Module, pairs: list[Pair], batch_size: int, max_length: int
) -> np.ndarray:
    """The reference scores of `pairs` from `run_dir`, computed and saved when not there yet."""
    from .checkpoints import write_bytes_atomic

    path = run_dir / f"reference-{name}.npz"
    key = fingerprint(pairs)
    if path.exists():
        with np.load(path) as saved:
            if str(saved["fingerprint"]) == key:
                return saved["logps"]
    logps = reference_logps(model, pairs, batch_size, max_length)
    import io

    buffer = io.BytesIO()
    np.savez(buffer, logps=logps, fingerprint=np.array(key))
    write_bytes_atomic(path, buffer.getvalue())
    return logps


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every LoRA/DoRA layer swapped for the layer it wraps: the base, with no
    copy of a weight (what scoring the reference during training would use)."""
    wrapped = [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "linear") and hasattr(m, "lora_a")
    ]
    model.update_modules(tree_unflatten([(name, m.linear) for name, m in wrapped]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(wrapped))


def with_reference(batch: Any, reference: np.ndarray | None) -> Any:
    """The batch with its rows' reference scores (zeros when the objective has none)."""
    if reference is None:
        batch.reference = mx.zeros((batch.tokens.shape[0],), mx.float32)
    else:
        picked = reference[batch.index]
        batch.reference = mx.array(np.concatenate([picked[:, 0], picked[:, 1]]))
    return batch
