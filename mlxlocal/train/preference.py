"""Preference objectives: DPO, ORPO and SimPO over pairs of answers to one prompt.

A batch holds B pairs as 2B rows (every chosen answer, then every rejected one), so both sides
of a pair are scored in the same forward pass. Each side's score is the sum (DPO) or mean (ORPO,
SimPO) of its answer tokens' log-probabilities. The formulas and the logged rewards are TRL's
(DPO `loss_type="sigmoid"`, plus cDPO's label smoothing; ORPO; CPO's `simpo` with
`cpo_alpha=0`), checked against TRL in tests/test_preference.py.

DPO's reference is the base model (or `method.reference`, a model or adapter folder): its
log-probabilities of every pair are computed once, before any adapter exists or any weight
moves, and cached in the run directory, where a resumed run finds them. Training never holds a
second model, full fine-tuning included; a reference folder is loaded, scored and freed before
the policy is loaded.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..adapters.files import (
    WEIGHTS,
    check_fits,
    header_shapes,
    linear_shapes,
    read_adapter_config,
)
from ..adapters.layers import load_adapters
from ..adapters.peft import is_peft_dir, read_any
from ..checkpoint.dtypes import DTYPES
from ..checkpoint.files import weight_files
from ..checkpoint.safetensors import read_header
from ..data import Pair, collate_pairs
from ..errors import MlxLocalError
from ..models import load, load_tokenizer, read_config
from .checkpoints import write_bytes_atomic
from .loss import chunked_cross_entropy, output_head

METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
BASE = "base"  # method.reference: the base model with the adapters off
CONFIGS = ("config.json", "adapter_config.json")  # what, with the weights, makes the scores


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
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """(loss sum, pairs, metric sums in METRICS order) of one batch of pairs.

    With `chunk_size` the output head runs over slices of positions (train/loss.py), so the
    whole logits never exist: see `_chunked_scores`."""
    b = tokens.shape[0] // 2
    w = weights[:, 1:]
    real = (segments[:, 1:] > 0).astype(mx.float32)  # every token of a row (ORPO's NLL)
    chosen_real = real[:b].sum()
    counts = w.sum(axis=-1)

    def pair_loss(logps, real_logps):
        nll = None
        if objective.name == "orpo":
            nll = -real_logps[:b].sum() / mx.maximum(chosen_real, 1)
        return pair_losses(objective, logps, counts, reference, nll)

    if chunk_size is None:
        per_token = token_logps(model, tokens)
        loss, chosen, rejected = pair_loss((per_token * w).sum(-1), (per_token * real).sum(-1))
    else:
        loss, chosen, rejected = _chunked_scores(model, tokens, w, real, pair_loss, chunk_size)
    chosen, rejected = mx.stop_gradient(chosen), mx.stop_gradient(rejected)
    margin = chosen - rejected
    sums = mx.stack([chosen.sum(), rejected.sum(), margin.sum(), (margin > 0).sum()])
    return loss, mx.array(chosen.shape[0], mx.float32), sums.astype(mx.float32)


def _chunked_scores(
    model: nn.Module,
    tokens: mx.array,
    w: mx.array,
    real: mx.array,
    pair_loss: Callable[[mx.array, mx.array], tuple[mx.array, mx.array, mx.array]],
    chunk_size: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """`pair_loss` of the rows' two sums of log-probabilities (answer tokens, every token),
    with the output head run one slice of positions at a time.

    The loss is a function f of per-row sums s = Σ_t w_t·log p_t, so its gradient is
    Σ_r ∂f/∂s_r · ∂s_r/∂θ: the gradient of the cross-entropy weighted w'_rt = -∂f/∂s_r·w_rt,
    which the chunked cross-entropy of SFT computes slice by slice. The sums are scored first
    (slice by slice, without gradients), ∂f/∂s taken from them, then that weighted
    cross-entropy supplies the gradient (its value cancels out of the loss).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = model.model(inputs)
    _, head = output_head(model)
    frozen = mx.stop_gradient(hidden)
    sums = [mx.zeros((tokens.shape[0],)), mx.zeros((tokens.shape[0],))]
    for i in range(0, frozen.shape[1], chunk_size):
        part = slice(i, i + chunk_size)
        h = mx.depends(frozen[:, part], sums) if i else frozen[:, part]
        logits = mx.stop_gradient(head(h)).astype(mx.float32)
        picked = mx.take_along_axis(logits, targets[:, part, None], axis=-1)[..., 0]
        logp = picked - mx.logsumexp(logits, axis=-1)
        sums = [sums[0] + (logp * w[:, part]).sum(-1), sums[1] + (logp * real[:, part]).sum(-1)]
    loss, chosen, rejected = pair_loss(*sums)
    slopes = mx.grad(lambda a, c: pair_loss(a, c)[0], argnums=(0, 1))(*sums)  # ∂f/∂s
    weighted = mx.stop_gradient(-(slopes[0][:, None] * w + slopes[1][:, None] * real))
    surrogate = chunked_cross_entropy(model, hidden, targets, weighted, chunk_size)
    loss = mx.stop_gradient(loss) + (surrogate - mx.stop_gradient(surrogate))
    return loss, chosen, rejected


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


def reference_identity(reference: str, base: Path) -> dict[str, str]:
    """What a cache was scored with: `reference` and a cheap fingerprint of its weight and
    config files (names, sizes, modification times; the base's too, under an adapter)."""
    folders = [base] if reference == BASE else [Path(reference)]
    if reference != BASE and is_adapter_folder(Path(reference)):
        folders.append(base)
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin") or f.name in CONFIGS:
                st = f.stat()
                h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"reference": reference, "files": h.hexdigest()}


@dataclass
class ReferenceCache:
    """The reference scores of each split's pairs, kept in the run directory as
    `reference-{split}.npz` with the pairs' fingerprint and what scored them."""

    run_dir: Path
    identity: dict[str, str]
    splits: dict[str, list[Pair]]
    scores: dict[str, np.ndarray]

    @classmethod
    def open(
        cls,
        run_dir: Path,
        reference: str,
        base: Path,
        splits: dict[str, list[Pair]],
        resuming: bool,
    ) -> ReferenceCache:
        """The caches in `run_dir` that hold these pairs' scores by this reference.

        A cache of other pairs is rescored. One of another reference (or of a reference
        folder whose files changed) is rescored before training starts, and refused when
        `resuming`: the trained steps measured their rewards against the old one, so going on
        would not continue the run exactly.
        """
        identity = reference_identity(reference, base)
        splits = {name: pairs for name, pairs in splits.items() if pairs}
        cache = cls(run_dir, identity, splits, {})
        for name, pairs in splits.items():
            if (logps := cache._read(name, pairs, resuming)) is not None:
                cache.scores[name] = logps
        return cache

    def _read(self, name: str, pairs: list[Pair], resuming: bool) -> np.ndarray | None:
        path = self.run_dir / f"reference-{name}.npz"
        if not path.exists():
            return None
        with np.load(path) as saved:
            if str(saved["fingerprint"]) != fingerprint(pairs):
                return None
            # A cache from before other references existed is the base's.
            made = {"reference": BASE, "files": self.identity["files"]}
            if "reference" in saved:
                made = {"reference": str(saved["reference"]), "files": str(saved["files"])}
            if made == self.identity:
                return saved["logps"]
        if resuming:
            what = (
                f"another reference ({made['reference']})"
                if made["reference"] != self.identity["reference"]
                else f"{made['reference']} before its files changed"
            )
            raise MlxLocalError(
                f"{path} holds the scores of {what}; resuming against a changed reference "
                "would not continue the run exactly: restore it, or train into a new output"
            )
        return None

    @property
    def missing(self) -> list[str]:
        return [name for name in self.splits if name not in self.scores]

    def score(
        self, model: nn.Module, batch_size: int, max_length: int, echo: Callable[[str], None]
    ) -> None:
        """Score the splits not cached yet with `model` (the reference) and save them."""
        for name in self.missing:
            pairs = self.splits[name]
            reference = self.identity["reference"]
            echo(f"scoring {len(pairs):,} {name} pairs with the reference ({reference})")
            logps = reference_logps(model, pairs, batch_size, max_length)
            buffer = io.BytesIO()
            np.savez(
                buffer,
                logps=logps,
                fingerprint=np.array(fingerprint(pairs)),
                reference=np.array(self.identity["reference"]),
                files=np.array(self.identity["files"]),
            )
            write_bytes_atomic(self.run_dir / f"reference-{name}.npz", buffer.getvalue())
            self.scores[name] = logps

    def of(self, pairs: list[Pair]) -> np.ndarray | None:
        """The scores of the split `pairs` is."""
        return next((self.scores.get(n) for n, p in self.splits.items() if p is pairs), None)


def is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").exists()


def check_reference(reference: str, base: Path, config: dict[str, Any], tokenizer: Any) -> None:
    """A reference folder that can score this run's pairs: adapters that fit the base, or a
    model with the base's vocabulary. Checked from files only (no weights read)."""
    if reference == BASE:
        return
    folder = Path(reference)
    where = f"method.reference: {folder}"
    if not folder.is_dir():
        raise MlxLocalError(
            f"{where}: no such folder; give base, a model folder or an adapter folder"
        )
    if is_adapter_folder(folder):
        if weight_files(base)[0] != "safetensors":
            return  # a .bin base's shapes are read with its weights, when applied
        if is_peft_dir(folder) or read_adapter_config(folder).get("fine_tune_type") != "full":
            check_fits(read_any(folder), linear_shapes(base, config), base)
            return
        shapes = header_shapes(base)
        for name, entry in read_header(folder / WEIGHTS)[0].items():
            if shapes.get(name) != entry["shape"]:
                raise MlxLocalError(
                    f"{where}: its weight {name} does not fit the base {base}; were these "
                    "weights trained on this model?"
                )
        return
    if not (folder / "config.json").exists() or not list(folder.glob("model*.safetensors")):
        raise MlxLocalError(
            f"{where}: neither a model folder (config.json, model*.safetensors; convert a "
            "checkpoint with `mlxlocal convert`) nor an adapter folder (adapter_config.json)"
        )
    theirs = read_config(folder)
    if theirs.get("vocab_size") != config.get("vocab_size") or (
        any(folder.glob("tokenizer*"))
        and load_tokenizer(folder).get_vocab() != tokenizer.get_vocab()
    ):
        raise MlxLocalError(
            f"{where}: its vocabulary is not the base's, so it cannot score the same tokens; "
            "use a model fine-tuned from the base"
        )


def load_reference(reference: str, dtype: str, load_base: Callable[[], nn.Module]) -> nn.Module:
    """The reference model alone (scored before the policy is loaded): a model folder in
    `dtype`, or the base (`load_base`) with the adapter folder applied."""
    folder = Path(reference)
    if is_adapter_folder(folder):
        model = load_base()
        load_adapters(model, folder)
    else:
        model, _ = load(folder, lazy=True)
        model.set_dtype(DTYPES[dtype])
    model.eval()
    mx.eval(model.parameters())
    return model


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
