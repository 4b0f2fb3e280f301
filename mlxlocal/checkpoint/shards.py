"""Sharded safetensors writing with bounded memory: a shard is flushed as soon as it is full."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from ..errors import MlxLocalError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2.5G' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise MlxLocalError(f"cannot read size {text!r}: write it like 5GB, 500MB or 2000000")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise MlxLocalError(f"size {text!r} must be positive")
    return size


class ShardWriter:
    """Collects evaluated arrays and writes `model-XXXXX-of-YYYYY.safetensors` plus the index."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, mx.array] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, array: mx.array) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._written):05d}.partial.safetensors"
        mx.save_safetensors(str(path), self._pending, metadata={"format": "mlx"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self, metadata: dict | None = None) -> list[str]:
        """Write the last shard, give shards their final names, write the index; return names."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        names, weight_map = [], {}
        for i, (path, keys) in enumerate(self._written):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {
            "metadata": {"total_size": self.total_bytes, **(metadata or {})},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
