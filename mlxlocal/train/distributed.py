"""Data parallelism on MLX's own distributed engine (`mx.distributed`, started by `mlx.launch`).

Every rank holds the model and walks the same global batch order; a step's micro-batches are
dealt round-robin, so rank r trains micro-batches r, r+W, r+2W, ... of the step. Gradient sums,
target-token counts and losses are summed across ranks once per optimizer step, so the update
is the one a single process makes on the whole global batch. Rank 0 alone writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from ..ranks import World

T = TypeVar("T")


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
