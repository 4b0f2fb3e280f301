"""Safetensors reading that checks a file before MLX touches it.

MLX's loader trusts the header; a truncated or hostile file must instead give the user one
clear line. We validate the header and every data offset, then let `mx.load` map tensors
lazily so a conversion reads one tensor at a time.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import mlx.core as mx

from ..errors import MlxLocalError
from .inputs import JSONProblem, decode_json

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20


def _bad(path: Path, what: str) -> MlxLocalError:
    return MlxLocalError(
        f"{path}: not a valid safetensors file ({what}); re-download or re-export the checkpoint"
    )


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor table, metadata) of a safetensors file, validated against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, "shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise MlxLocalError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = decode_json(raw)
    except JSONProblem as e:
        raise _bad(path, f"header is {e}") from e
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(path, "__metadata__ is not an object")
    data_size = size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    return header, metadata


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r} has a bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
    ):
        raise _bad(path, f"tensor {name!r} has bad data offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _bad(
            path, f"tensor {name!r} data [{begin}, {end}) lies outside the {data_size} data bytes"
        )
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise _bad(path, f"tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}")


def load_lazy(path: Path) -> dict[str, mx.array]:
    """Validated, lazily-read tensors: each is read from disk only when evaluated.

    F8_E4M3 tensors come back as their exact bfloat16 values (MLX would give raw uint8 bytes);
    applying their scales is the caller's job (checkpoint/fp8.py). F8_E5M2, which MLX cannot
    read, is refused by name.
    """
    header, _ = read_header(path)
    if not header:
        return {}
    for name, entry in header.items():
        if entry["dtype"] == "F8_E5M2":
            raise MlxLocalError(
                f"{path}: tensor {name!r} is F8_E5M2, which mlxlocal cannot read; "
                "use a bfloat16 or F8_E4M3 release of the checkpoint"
            )
    try:
        tensors = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise _bad(Path(path), str(e)) from e
    for name, entry in header.items():
        if entry["dtype"] == "F8_E4M3":
            tensors[name] = mx.from_fp8(tensors[name], dtype=mx.bfloat16)
    return tensors
