"""Measured peak memory of our training engine on a model built from a config (random weights).

What `run` does between loading and the end of training — QLoRA quantization, adapters or full
training, the optimizer, the compiled step with gradient checkpointing, packing and the chunked
loss — on batches of the recipe's worst-case shape, so `plan`'s estimate can be checked against
`mx.get_peak_memory()`. Weights are random: memory depends on shapes, not values.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlocal.checkpoint.dtypes import DTYPES, compute_dtype
from mlxlocal.models import model_classes
from mlxlocal.recipe import Recipe
from mlxlocal.train.optim import build_optimizer
from mlxlocal.train.preference import Objective, sequence_logps
from mlxlocal.train.run import prepare_method, quantize_for_training
from mlxlocal.train.trainer import gradient_checkpointing, make_step


@dataclass
class RandomBatch:
    tokens: mx.array
    weights: mx.array
    segments: mx.array
    reference: mx.array | None = None  # a preference batch's reference scores (2B rows)


def random_batch(vocab: int, batch: int, length: int, packed: bool, seed: int) -> RandomBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    # Packed rows: examples of ~length/4 tokens, each a segment; unpacked: one per row.
    segments = (np.arange(length)[None] * 4 // length + 1) if packed else np.ones((1, length))
    segments = np.broadcast_to(segments, (batch, length)).astype(np.int32)
    weights = np.ones((batch, length), np.float32)
    return RandomBatch(mx.array(tokens), mx.array(weights), mx.array(segments))


def measured_peak(config: dict[str, Any], recipe: Recipe, steps: int = 2) -> int:
    """Peak bytes MLX allocated from building the model to the end of `steps` training steps.

    A preference recipe trains batches of 2 × batch_size rows; DPO first scores one such batch
    with the model before adapters are added, as `run` scores its reference."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(DTYPES[compute_dtype(recipe.model.dtype)])
    if recipe.model.quantize is not None:
        quantize_for_training(model, recipe.model.quantize)
    mx.eval(model.parameters())
    t, d = recipe.training, recipe.data
    objective = Objective.of(recipe.method)
    rows = t.batch_size * (2 if objective else 1)
    if objective is not None and objective.needs_reference:
        b = random_batch(config["vocab_size"], rows, d.max_length, False, 7)
        mx.eval(sequence_logps(model, b.tokens, b.weights))
    prepare_method(model, recipe, Path("base"))
    optimizer = build_optimizer(t, steps)
    optimizer.init(model.trainable_parameters())
    step = make_step(
        model,
        optimizer,
        grad_clip=t.grad_clip,
        loss_chunk_size=t.loss_chunk_size,
        packed=d.packing,
        compile=t.compile,
        objective=objective,
    )
    state = [model.state, optimizer.state, mx.random.state]
    model.train()
    with gradient_checkpointing(model) if t.grad_checkpoint else nullcontext():
        for i in range(steps):
            micro = [
                random_batch(config["vocab_size"], rows, d.max_length, d.packing, i * 97 + k)
                for k in range(t.grad_accumulation)
            ]
            for b in micro if objective is not None else ():
                b.reference = mx.zeros((rows,))
            mx.eval(state, *step(micro))
    peak = mx.get_peak_memory()
    del model, optimizer, step, state
    mx.clear_cache()
    return peak
