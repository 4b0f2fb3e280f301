"""Sharded safetensors writing that streams: one tensor in memory at a time.

Shapes and dtypes of MLX's lazy arrays are known before evaluation, so every shard's header is
written up front and each tensor's bytes follow as soon as it is computed. Peak memory is one
tensor, whatever the shard size.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np

from ..errors import MlxLocalError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)
_CODES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.int16: "I16",
    mx.uint16: "U16",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.int32: "I32",
    mx.uint32: "U32",
    mx.float32: "F32",
    mx.int64: "I64",
    mx.uint64: "U64",
}


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


def open_output(path: Path) -> BinaryIO:
    return open(path, "wb")


class ShardWriter:
    """Writes `model[-XXXXX-of-YYYYY].safetensors` + index for a known list of lazy arrays.

    Use it as a context manager and call `write` once per array, in the order given at
    construction: leaving the block normally writes the index (with `metadata`), leaving it on
    an exception closes the open shard so the caller's atomic directory can be discarded.
    `names` and `total_bytes` stay readable afterwards.
    """

    def __init__(
        self,
        directory: Path,
        arrays: dict[str, mx.array],
        max_shard_bytes: int,
        metadata: dict | None = None,
    ):
        self.directory = Path(directory)
        self.metadata = metadata or {}
        self.shards: list[list[str]] = [[]]
        size = 0
        for name, a in arrays.items():
            if a.dtype not in _CODES:
                raise MlxLocalError(f"tensor {name} has dtype {a.dtype}, which safetensors lacks")
            if self.shards[-1] and size + a.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(name)
            size += a.nbytes
        n = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._layout = {k: (tuple(a.shape), a.dtype, a.nbytes) for k, a in arrays.items()}
        self._order = [k for shard in self.shards for k in shard]
        self._starts = {shard[0]: i for i, shard in enumerate(self.shards) if shard}
        self._next = 0
        self._file: BinaryIO | None = None
        self.total_bytes = sum(nbytes for _, _, nbytes in self._layout.values())

    def _open_shard(self, i: int) -> None:
        if self._file:
            self._file.close()
        header: dict = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for name in self.shards[i]:
            shape, dtype, nbytes = self._layout[name]
            header[name] = {
                "dtype": _CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open_output(self.directory / self.names[i])
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: mx.array) -> None:
        expected = self._order[self._next]
        if name != expected or (tuple(array.shape), array.dtype) != self._layout[name][:2]:
            raise ValueError(f"ShardWriter expected {expected}, got {name} {array.shape}")
        if name in self._starts:
            self._open_shard(self._starts[name])
        mx.eval(array)
        raw = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
        self._file.write(np.ascontiguousarray(np.asarray(raw)).data)
        self._next += 1
        del array, raw
        mx.clear_cache()  # return the buffer to the OS rather than MLX's cache

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        complete = self._next == len(self._order)
        if exc_type is None and complete:
            self._write_index()
            return
        if self._file:
            self._file.close()
        if exc_type is None:
            raise ValueError(f"ShardWriter left after {self._next} of {len(self._order)} tensors")

    def _write_index(self) -> None:
        if self._file is None:
            self._open_shard(0)  # a model with no tensors still gets a valid, empty file
        self._file.close()
        weight_map = {k: self.names[i] for i, shard in enumerate(self.shards) for k in shard}
        index = {
            "metadata": {"total_size": self.total_bytes, **self.metadata},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
