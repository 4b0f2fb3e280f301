"""Batches for training: packed rows or length buckets, deterministic per (seed, epoch).

Packing puts many short examples in one row (first-fit) and numbers them in `segments`, so the
engine can keep them from attending to each other. Without packing, examples of similar length
share a batch, so little of it is padding. Either way an epoch's plan is a pure function of
(lengths, seed, epoch): resuming at batch k rebuilds the plan and skips k batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..data import Batch, Pair, collate, collate_pairs

BUCKET_WINDOW = 64  # batches per window of examples sorted by length (more = less padding)


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed into rows of `capacity`, each into the first row with room.

    A max-tree over every row's free space finds that row in O(log n); rows not yet opened are
    empty leaves, so the leftmost leaf with room is either an open row or the next new one.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_length: int, packing: bool, seed: int, epoch: int
) -> list[list[list[int]]]:
    """Each batch's rows, each row's example indices, for one epoch."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    if packing:
        rows = [
            [int(order[j]) for j in row] for row in first_fit(lengths[order].tolist(), max_length)
        ]
        # Rows of similar fill together keep the last, emptier rows from padding full batches.
        rows.sort(key=lambda row: -int(lengths[row].sum()))
    else:
        if lengths.size and lengths.max() > max_length:
            raise ValueError(f"an example has {lengths.max()} tokens, more than max_length")
        window = batch_size * BUCKET_WINDOW
        rows = []
        for w in range(0, len(order), window):
            chunk = order[w : w + window]
            rows += [[int(i)] for i in chunk[np.argsort(lengths[chunk], kind="stable")]]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def num_batches(
    examples, batch_size: int, max_length: int, packing: bool, seed: int, epoch: int
) -> int:
    lengths = [len(e.tokens) for e in examples]
    return len(plan_batches(lengths, batch_size, max_length, packing, seed, epoch))


def iterate_batches(
    examples,
    batch_size: int,
    max_length: int,
    packing: bool,
    seed: int,
    epoch: int,
    start: int = 0,
) -> Iterator[Batch]:
    """One epoch of batches; `start` skips the first `start` (an exact resume)."""
    lengths = [len(e.tokens) for e in examples]
    plan = plan_batches(lengths, batch_size, max_length, packing, seed, epoch)
    for rows in plan[start:]:
        yield collate([[examples[i] for i in row] for row in rows], max_length)


def iterate_pair_batches(
    pairs: Sequence[Pair], batch_size: int, max_length: int, seed: int, epoch: int, start: int = 0
) -> Iterator[Batch]:
    """One epoch of preference batches (pairs are never packed: both sides share a batch)."""
    lengths = [len(p.tokens) for p in pairs]
    for rows in plan_batches(lengths, batch_size, max_length, False, seed, epoch)[start:]:
        index = [i for row in rows for i in row]
        yield collate_pairs([pairs[i] for i in index], index, max_length)
