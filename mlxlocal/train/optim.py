"""The optimizer and learning-rate schedule a recipe's `training` section asks for."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim

from ..errors import MlxLocalError
from ..recipe import TrainingSection

OPTIMIZERS = {
    "adamw": optim.AdamW,
    "adam": optim.Adam,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}


def build_schedule(
    learning_rate: float,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_learning_rate: float = 0.0,
) -> Callable[[mx.array], mx.array]:
    """Learning rate per optimizer step (0-based): linear warmup, then constant/cosine/linear.

    Warmup reaches `learning_rate` at step `warmup_steps` - 1, so no step runs at rate zero.
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = optim.linear_schedule(learning_rate, learning_rate, 1)
    elif schedule == "cosine":
        main = optim.cosine_decay(learning_rate, decay_steps, min_learning_rate)
    elif schedule == "linear":
        main = optim.linear_schedule(learning_rate, min_learning_rate, decay_steps)
    else:
        raise MlxLocalError(
            f"training.schedule: unknown {schedule!r}; use constant, cosine, linear"
        )
    if warmup_steps <= 1:
        return main
    warmup = optim.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps - 1)
    return optim.join_schedules([warmup, main], [warmup_steps])


def build_optimizer(training: TrainingSection, total_steps: int) -> optim.Optimizer:
    """An mlx.optimizers optimizer from `training` (optimizer, optimizer_args, the schedule)."""
    cls = OPTIMIZERS[training.optimizer]
    args = dict(training.optimizer_args or {})
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "learning_rate"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise MlxLocalError(
            f"training.optimizer_args.{unknown[0]}: {training.optimizer} does not take it; "
            f"it takes {', '.join(sorted(accepted))}"
        )
    if training.optimizer == "adafactor":
        # With an explicit learning rate Adafactor must not derive its own from the step.
        args.setdefault("relative_step", False)
    schedule = build_schedule(
        training.learning_rate,
        training.schedule,
        total_steps,
        training.warmup_steps,
        training.min_learning_rate,
    )
    try:
        return cls(learning_rate=schedule, **args)
    except (TypeError, ValueError) as e:
        raise MlxLocalError(f"training.optimizer_args: {e}") from e
