"""This process's place among the ranks that `mlx.launch` started (`mx.distributed`).

Training (train/distributed.py) and evaluation share it: each rank works on every W-th item
and the results are summed across ranks, so all ranks end up holding the same whole answer.
Not launched by `mlx.launch`, the world is one rank and every call is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map


@dataclass(frozen=True)
class World:
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

    def mine(self, n: int) -> range:
        """This rank's share of `n` items: every W-th, from its rank on."""
        return range(self.rank, n, self.size)

    def merge(self, n: int, indices: list[int], rows: list[list[float]]) -> list[list[float]]:
        """The rows of all `n` items, from each rank's `rows` of its items `indices`: a rank's
        rows go into zeros elsewhere and the ranks' tables are summed (exact: one non-zero
        term each)."""
        if self.size == 1:
            return rows
        width = int(self.all_gather(mx.array([len(rows[0]) if rows else 0])).max().item())
        table = mx.zeros((n, width), dtype=mx.float32)
        if indices:
            table[mx.array(indices)] = mx.array(rows, dtype=mx.float32)
        return self.all_sum(table).tolist()

    def merge_texts(self, n: int, indices: list[int], texts: list[str]) -> list[str]:
        """`merge` for strings (as UTF-8 bytes with their length, padded to the longest)."""
        if self.size == 1:
            return texts
        data = [t.encode() for t in texts]
        longest = int(self.all_gather(mx.array([max(map(len, data), default=0)])).max().item())
        rows = [[len(b), *b, *[0] * (longest - len(b))] for b in data]
        merged = self.merge(n, indices, rows)
        return [bytes(int(x) for x in r[1 : 1 + int(r[0])]).decode() for r in merged]


SINGLE = World()


def init() -> World:
    """The world this process runs in; `mx.distributed.init()` once, as MLX asks."""
    group = mx.distributed.init()
    if group.size() == 1:
        return SINGLE
    return World(group.rank(), group.size(), group)
