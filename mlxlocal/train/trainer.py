"""The training loop, written out: k micro-batches → one optimizer step → one line of metrics.

A step is an MLX graph: value_and_grad of the summed masked loss over the trainable parameters,
gradients summed over the micro-batches and divided by the step's target tokens (so k
accumulated batches give exactly the update of one k-times larger batch), global-norm clipping,
the optimizer update with its schedule. It is compiled with the model, optimizer and RNG state
as inputs and outputs, and evaluated once.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..errors import MlxLocalError
from ..progress import LineProgress
from ..progress import bar as progress_bar
from ..ranks import SINGLE, World
from ..recipe import CheckpointSection, EvalSection, TrainingSection
from .checkpoints import Position, RunDir, rng_key
from .distributed import take_step
from .loss import loss_sums
from .preference import Objective, batch_loss, metrics_record


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the step under way finished and `checkpoint` holds it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped after step {step}; {checkpoint} holds it")
        self.step, self.checkpoint = step, checkpoint


class Batch(Protocol):
    tokens: mx.array  # (B, L) int32
    weights: mx.array  # (B, L) float32, 1 where the token is a target
    segments: mx.array  # (B, L) int32, 1..k per packed example, 0 for padding


@dataclass
class TrainResult:
    steps: int
    loss: float | None
    val_loss: float | None
    trained_tokens: int
    tokens_per_s: float
    peak_memory_gb: float
    elapsed_s: float


class BatchStream:
    """Batches epoch after epoch, addressed by (epoch, index) so a checkpoint can name the next.

    `make(epoch, start)` yields epoch `epoch`'s batches from index `start`, the same ones every
    time; `epochs` None streams forever (training by steps).
    """

    def __init__(self, make: Callable[[int, int], Iterable[Batch]], epochs: int | None = None):
        self.make = make
        self.epochs = epochs

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, index of the batch after this one, batch)."""
        while self.epochs is None or epoch < self.epochs:
            index = start
            for batch in self.make(epoch, start):
                index += 1
                yield epoch, index, batch
            if index == 0:
                raise MlxLocalError("the training data gives no batches: add examples")
            epoch, start = epoch + 1, 0


def make_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    grad_clip: float | None = None,
    loss_chunk_size: int | None = None,
    packed: bool = False,
    compile: bool = True,
    world: World = SINGLE,
    objective: Objective | None = None,
) -> Callable[[Sequence[Batch]], tuple[mx.array, ...]]:
    """A function that trains one optimizer step on its micro-batches.

    It returns lazy (loss sum, count, non-pad tokens, gradient norm, metric sums); the caller
    evaluates them together with the model and optimizer state. The count is target tokens,
    or pairs for a preference `objective` (whose metric sums are `preference.METRICS`).
    Initialise (or restore) the optimizer state before calling this: the compiled graph
    captures it. Under several ranks the sums are over every rank's micro-batches: gradients
    divided by the whole step's count and summed across ranks, then clipped, so all ranks make
    the same update.
    """

    def loss_fn(tokens, weights, segments, *reference):
        if objective is not None:
            arrays = (tokens, weights, segments, *reference)
            return batch_loss(model, objective, *arrays, chunk_size=loss_chunk_size)
        loss, n = loss_sums(model, tokens, weights, segments, packed, loss_chunk_size)
        return loss, n, mx.zeros((0,))

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def accumulate(acc, *arrays):
        (loss, n, sums), grads = loss_and_grad(*arrays)
        if acc is not None:
            grads = tree_map(mx.add, acc, grads)
        return loss, n, sums, grads

    def update(grads, n):
        grads = tree_map(lambda g: (g / mx.maximum(n, 1)).astype(g.dtype), grads)
        grads = world.sum_gradients(grads)
        norm = mx.array(0.0)
        if grad_clip is not None:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return norm

    if compile:
        state = [model.state, optimizer.state, mx.random.state]
        accumulate = partial(mx.compile, inputs=state, outputs=state)(accumulate)
        update = partial(mx.compile, inputs=state, outputs=state)(update)

    def step(batches: Sequence[Batch]):
        acc, loss, n, tokens, sums = None, 0, 0, 0, 0
        for i, b in enumerate(batches):
            part, count, part_sums, acc = accumulate(acc, *inputs(b, objective))
            loss, n, tokens = loss + part, n + count, tokens + (b.segments > 0).sum()
            sums = sums + part_sums
            if i < len(batches) - 1:
                mx.eval(acc, loss, n, tokens, sums)  # one micro-batch's graph alive at a time
        if world.size > 1:  # one small all-reduce for the step's sums
            total = mx.concatenate([mx.stack([loss, n, tokens]).astype(mx.float32), sums])
            total = world.all_sum(total)
            loss, n, tokens, sums = total[0], total[1], total[2], total[3:]
        return loss, n, tokens, update(acc, n), sums

    return step


def inputs(b: Batch, objective: Objective | None) -> tuple[mx.array, ...]:
    """The arrays of a batch the loss reads (a preference batch adds its reference scores)."""
    arrays = (b.tokens, b.weights, b.segments)
    return (*arrays, b.reference) if objective is not None else arrays


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    max_batches: int | None = None,
    loss_chunk_size: int | None = None,
    packed: bool = False,
    world: World = SINGLE,
    objective: Objective | None = None,
) -> tuple[float, dict[str, float]]:
    """(mean loss per target token, or per pair for a preference `objective`, and the
    objective's metrics) over (at most `max_batches` of) `batches`; under several ranks each
    evaluates every W-th batch and the sums are gathered."""
    model.eval()
    total, n, sums = mx.array(0.0), mx.array(0.0), mx.array(0.0)
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if i % world.size != world.rank:
            continue
        if objective is not None:
            arrays = inputs(b, objective)
            loss, count, part = batch_loss(model, objective, *arrays, chunk_size=loss_chunk_size)
            sums = sums + part
        else:
            loss, count = loss_sums(model, b.tokens, b.weights, b.segments, packed, loss_chunk_size)
        total, n = total + loss, n + count
        mx.eval(total, n, sums)
    model.train()
    total, n, sums = world.all_sum(total), world.all_sum(n), world.all_sum(sums)
    metrics = metrics_record(sums, n.item(), "val_") if objective is not None else {}
    return total.item() / max(n.item(), 1.0), metrics


@contextmanager
def gradient_checkpointing(model: nn.Module) -> Iterator[None]:
    """Recompute each block's activations in the backward pass instead of keeping them.

    mlx-lm's blocks are called through their class, so the class's `__call__` is wrapped for
    the duration and restored afterwards.
    """
    originals = {cls: cls.__call__ for cls in {type(layer) for layer in model.layers}}

    def checkpointed(call):
        def wrapper(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        return wrapper

    for cls, call in originals.items():
        cls.__call__ = checkpointed(call)
    try:
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


@contextmanager
def stop_after_step() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks training to stop once the step under way is done and saved (a
    step cut in half cannot be resumed exactly); a second one stops at once, as usual."""
    asked: list[bool] = []
    if threading.current_thread() is not threading.main_thread():  # only it gets signals
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        asked.append(True)
        signal.signal(signal.SIGINT, previous)
        sys.stderr.write("\nstopping after this step (Ctrl-C again to stop now)\n")

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    stream: BatchStream,
    total_steps: int,
    run: RunDir,
    position: Position,
    adapter_config: dict[str, Any],
    *,
    training: TrainingSection,
    evaluation: EvalSection,
    checkpoints: CheckpointSection,
    packed: bool,
    valid: Callable[[], Iterable[Batch]] | None = None,
    on_checkpoint: Callable[[], None] = lambda: None,
    world: World = SINGLE,
    objective: Objective | None = None,
) -> TrainResult:
    """Train from `position` to `total_steps`, logging, evaluating and checkpointing.

    The last step is always checkpointed, so a finished run can be continued exactly; Ctrl-C
    checkpoints the step under way and raises `Interrupted`. `packed` says the batches hold
    several examples per row (their segments mask attention). `on_checkpoint` runs after
    each checkpoint but the last (the run's report refreshes there). Under several ranks
    (`world`) each trains its share of every step's micro-batches (`rank_share`) and only rank
    0 logs and checkpoints.
    """
    t = training
    step_fn = make_step(
        model,
        optimizer,
        grad_clip=t.grad_clip,
        loss_chunk_size=t.loss_chunk_size,
        packed=packed,
        compile=t.compile,
        world=world,
        objective=objective,
    )
    state = [model.state, optimizer.state, mx.random.state]
    batches = stream.iterate(position.epoch, position.batch)
    loss, val_loss = position.loss, None
    start_step, start_tokens, train_time = position.step, position.trained_tokens, 0.0
    bar = (
        progress_bar("training", total_steps, "step")
        if world.main
        else LineProgress("training", total_steps, "step", None, None)
    )
    bar.initial = bar.n = bar.last_print_n = position.step  # a resumed run's ETA counts on
    model.train()
    with (
        gradient_checkpointing(model) if t.grad_checkpoint else nullcontext(),
        bar,
        stop_after_step() as stop_asked,
    ):
        while position.step < total_steps:
            tic = time.perf_counter()
            epoch, index, micro = take_step(batches, t.grad_accumulation, world)
            loss_sum, n, tokens, norm, sums = step_fn(micro)
            mx.eval(state, loss_sum, n, tokens, norm, sums)
            seconds = time.perf_counter() - tic
            train_time += seconds
            loss = loss_sum.item() / max(n.item(), 1.0)
            position = Position(
                step=position.step + 1,
                epoch=epoch,
                batch=index,
                trained_tokens=position.trained_tokens + int(tokens.item()),
                elapsed_s=position.elapsed_s + seconds,
                rng=rng_key(),
                loss=loss,
                world_size=world.size,
            )
            record = {
                "step": position.step,
                "epoch": epoch,
                "loss": loss,
                "learning_rate": optimizer.learning_rate.item(),
                "tokens": int(tokens.item()),
                "tokens_per_s": tokens.item() / seconds,
                "trained_tokens": position.trained_tokens,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "elapsed_s": position.elapsed_s,
            }
            if world.size > 1:
                peaks = world.all_gather(mx.array([mx.get_peak_memory() / 1e9])).tolist()
                record["peak_memory_gb"] = max(peaks)
                record["rank_peak_memory_gb"] = peaks
            if objective is not None:
                record |= metrics_record(sums, n.item())
            if t.grad_clip is not None:
                record["grad_norm"] = norm.item()
            if not math.isfinite(loss):
                if world.main:
                    run.log(record)
                kept = run.latest()
                raise MlxLocalError(
                    f"loss became {loss} at step {position.step}: training stopped"
                    + (f"; the last good checkpoint {kept} is kept" if kept else "")
                    + ". Lower training.learning_rate or set training.grad_clip"
                )
            last = position.step == total_steps
            every = evaluation.every
            if valid is not None and ((every and position.step % every == 0) or last):
                val_loss, val_metrics = evaluate(
                    model,
                    valid(),
                    max_batches=evaluation.batches,
                    loss_chunk_size=t.loss_chunk_size,
                    packed=packed,
                    world=world,
                    objective=objective,
                )
                record["val_loss"] = val_loss
                record |= val_metrics
                mx.clear_cache()  # validation's buffers are not the training step's shapes
            if world.main:
                run.log(record)
            every = checkpoints.every
            saved = None
            if (every and position.step % every == 0) or last or stop_asked():
                saved = run.path / f"step-{position.step}"
                if world.main:
                    saved = run.save_checkpoint(
                        model, optimizer, position, adapter_config, checkpoints.keep
                    )
                if world.main and not last and not stop_asked():
                    on_checkpoint()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if stop_asked() and saved is not None:
                raise Interrupted(position.step, saved)
    trained = position.trained_tokens - start_tokens
    return TrainResult(
        steps=position.step - start_step,
        loss=loss,
        val_loss=val_loss,
        trained_tokens=position.trained_tokens,
        tokens_per_s=trained / train_time if train_time else 0.0,
        peak_memory_gb=max(world.all_gather(mx.array([mx.get_peak_memory() / 1e9])).tolist()),
        elapsed_s=position.elapsed_s,
    )
