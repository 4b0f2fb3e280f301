"""Data parallelism on MLX's own distributed engine (`mx.distributed`, started by `mlx.launch`).

Every rank holds the model and walks the same global batch order; a step's micro-batches are
dealt round-robin, so rank r trains micro-batches r, r+W, r+2W, ... of the step. Gradient sums,
target-token counts and losses are summed across ranks once per optimizer step, so the update
is the one a single process makes on the whole global batch. Rank 0 alone writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (size 1 when not launched by `mlx.launch`)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def all_gather(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_gather(x, group=self.group)

    def sum_gradients(self, grads: Any) -> Any:
        """Σ over ranks of `grads`, in a few large all-reduces (`nn.average_gradients` × W)."""
        if self.size == 1:
            return grads
        scaled = tree_map(lambda g: g * self.size, grads)
        return nn.average_gradients(scaled, group=self.group)

    def barrier(self) -> None:
        """Wait until every rank gets here (rank 0 has written what the others read)."""
        if self.size > 1:
            mx.eval(self.all_sum(mx.array(1.0)))


SINGLE = World()


def init() -> World:
    """The world this process runs in; `mx.distributed.init()` once, as MLX asks."""
    group = mx.distributed.init()
    if group.size() == 1:
        return SINGLE
    return World(group.rank(), group.size(), group)


def rank_share(count: int, rank: int, size: int) -> list[int]:
    """Which of a step's `count` micro-batches (in the global order) rank `rank` trains.

    Round-robin: disjoint across ranks and together all of them, so W ranks with k micro-batches
    each see exactly what one process with k·W micro-batches sees.
    """
    if count % size:
        raise ValueError(f"{count} micro-batches do not split evenly over {size} ranks")
    return list(range(rank, count, size))


def take_step(
    batches: Iterator[tuple[int, int, T]], per_rank: int, world: World
) -> tuple[int, int, list[T]]:
    """Draw one optimizer step's micro-batches (`per_rank` × world size of them, in the global
    order) from `batches` of (epoch, next index, batch); keep this rank's share.

    Returns the (epoch, next index) after the step, as every rank sees it, and the kept ones.
    """
    count = per_rank * world.size
    mine = set(rank_share(count, world.rank, world.size))
    kept = []
    for j in range(count):
        epoch, index, batch = next(batches)
        if j in mine:
            kept.append(batch)
    return epoch, index, kept
