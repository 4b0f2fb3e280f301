"""GGUF at the byte level: validated reading, and exact moves between GGML blocks and MLX's
affine quantization.

GGML's Q4_1 block (32 weights: f16 scale d, f16 minimum m, 4-bit codes, w = d·q + m) is MLX's
4-bit affine quantization with group size 32 (w = scale·q + bias), stored in another order.
Q4_0 (w = d·(q − 8)) and Q8_0 (w = d·q, q signed) are affine too, with bias −8d and −128d, so
all three move between the formats without touching a single weight.
"""

from __future__ import annotations

import bisect
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import MlxLocalError

Q = GGMLQuantizationType
# GGML types MLX holds natively: float dtypes (stored as numpy dtype, named as in DTYPES), or
# (bits, bias in units of the scale).
FLOAT_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}
FLOAT_DTYPES = {Q.F32: "float32", Q.F16: "float16", Q.BF16: "bfloat16"}
AFFINE_TYPES = {Q.Q4_1: (4, None), Q.Q4_0: (4, -8), Q.Q8_0: (8, -128)}
GROUP = 32


class _BoundedReader(GGUFReader):
    """The gguf package's reader, refusing an array that claims more entries than the file has
    bytes left: it reads arrays entry by entry, and past the end of the file an entry is empty
    and takes no bytes, so a count of 2^60 loops (and grows a list) without end."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type == GGUFValueType.ARRAY:
            count = int(self._get(orig_offs + 4, np.uint64)[0])  # after the item type
            if count > len(self.data) - orig_offs:  # each entry takes at least one byte
                raise ValueError(f"an array claims {count} entries, more than the file holds")
        return super()._get_field_parts(orig_offs, raw_type)


# The fewest bytes a tensor's description and a metadata entry take in a GGUF header: name
# length, dimension count, type and offset; key length, type and a 1-byte value.
_TENSOR_INFO_BYTES, _KV_BYTES = 24, 13


def _check_counts(path: Path) -> None:
    """Refuse a header whose tensor and key counts its file cannot hold, before the reader
    tries (it fails deep inside numpy, or allocates for 2^60 entries)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
        size = path.stat().st_size
    except OSError:
        return  # the reader says what is wrong
    version = struct.unpack("<I", head[4:8])[0] if len(head) == 24 else 0
    if head[:4] != b"GGUF" or not 2 <= version <= 0xFFFF:
        return  # not GGUF, version 1 (32-bit counts) or big-endian: the reader decides
    tensors, keys = struct.unpack("<QQ", head[8:24])
    if tensors * _TENSOR_INFO_BYTES + keys * _KV_BYTES > size:
        raise MlxLocalError(
            f"{path}: its header claims {tensors} tensors and {keys} metadata entries, more "
            f"than its {size} bytes can hold; the file is corrupt — re-download it"
        )


def open_gguf(path: Path) -> tuple[GGUFReader, dict[str, Any]]:
    """A GGUF reader whose every tensor is non-empty and fills exactly its own bytes of the file,
    and its metadata as Python values (lists for arrays)."""
    path = Path(path)
    _check_counts(path)
    try:
        reader = _BoundedReader(path)
        fields = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except UnicodeDecodeError as e:  # a key, a metadata value or a token
        raise MlxLocalError(
            f"{path}: a string in its metadata is not UTF-8 (byte {e.object[e.start]:#04x}); "
            "the file is corrupt — re-download it"
        ) from e
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise MlxLocalError(
            f"{path}: not a readable GGUF file: its metadata ends early or is malformed "
            f"({_one_line(e)}); the file is truncated or corrupt — re-download it"
        ) from e
    size = path.stat().st_size
    starts = sorted(int(t.data_offset) for t in reader.tensors)
    for t in reader.tensors:
        if not all(int(n) > 0 for n in t.shape):
            raise MlxLocalError(
                f"{path}: tensor {t.name} has shape {[int(n) for n in t.shape][:8]}, with an "
                "empty dimension; the file is corrupt — re-download it"
            )
        start = int(t.data_offset)
        end = start + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise MlxLocalError(
                f"{path}: tensor {t.name} runs past the end of the file ({end} > {size} bytes); "
                "the file is truncated, re-download it"
            )
        # Writers pad each tensor to the alignment: any other gap or overlap means the bytes
        # stored do not match the tensor's shape and type.
        following = bisect.bisect_right(starts, start)
        room = (starts[following] if following < len(starts) else size) - start
        if following - bisect.bisect_left(starts, start) > 1:  # another tensor starts here too
            room = 0
        last = following == len(starts)  # trailing bytes after the last tensor are harmless
        if room < int(t.n_bytes) or (not last and room >= int(t.n_bytes) + reader.alignment):
            raise MlxLocalError(
                f"{path}: tensor {t.name} ({t.tensor_type.name}, shape "
                f"{[int(n) for n in t.shape][:8]}) needs {int(t.n_bytes)} bytes but {room} are "
                "stored for it; the file is corrupt — re-download it"
            )
    return reader, fields


def _value(field) -> Any:
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [field.contents(i) for i in range(len(field.data))]
    return field.contents()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


REQUIRED = object()
# kind → (Python types, what one value should be, what a list should hold)
_KINDS = {
    "text": ((str,), "a string", "strings"),
    "integer": ((int,), "an integer", "integers"),
    "count": ((int,), "a positive integer", "positive integers"),
    "number": ((int, float), "a number", "numbers"),
    "positive": ((int, float), "a positive number", "positive numbers"),
    "flag": ((bool,), "true or false", "booleans"),
}


def get_field(fields: dict[str, Any], key: str, kind: str, default: Any = REQUIRED) -> Any:
    """GGUF metadata `key` checked to be of `kind` (a `_KINDS` name, or "list of <name>").

    A value of the wrong type is the file's fault and gets one line here, before it can crash
    or silently miswrite a config later; so does a missing key that has no default.
    """
    value = fields.get(key, default)
    if value is REQUIRED:
        raise MlxLocalError(f"the GGUF lacks {key}; is the file complete?")
    if key not in fields:
        return value
    item = kind.removeprefix("list of ")
    _, one, many = _KINDS[item]
    if item == kind:
        ok = _is(value, item)
    else:
        ok = isinstance(value, list) and all(_is(v, item) for v in value)
    if not ok:
        raise MlxLocalError(
            f"the GGUF's {key} is {str(value)[:40]!r}, not "
            f"{one if item == kind else 'a list of ' + many}; the file is corrupt — re-download it"
        )
    return value


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) != (kind == "flag") or not isinstance(value, _KINDS[kind][0]):
        return False
    if kind in ("number", "positive") and not math.isfinite(value):
        return False
    return kind not in ("count", "positive") or value > 0


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    rows, cols = codes.shape
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).reshape(1, 1, per_word)
    words = codes.astype(np.uint32).reshape(rows, cols // per_word, per_word) << shifts
    return np.bitwise_or.reduce(words, axis=-1)


def _unpack(words: np.ndarray, bits: int) -> np.ndarray:
    rows = words.shape[0]
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).reshape(1, 1, per_word)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(rows, -1).astype(np.uint8)


def mlx_q4_to_q4_1(words: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """MLX 4-bit, group-32 (uint32 words, f16 scales/biases) → Q4_1 blocks, (rows, bytes)."""
    rows = words.shape[0]
    codes = _unpack(words, 4).reshape(rows, -1, 2, 16)  # 32 codes per block, two halves
    qs = codes[:, :, 0, :] | (codes[:, :, 1, :] << np.uint8(4))
    d = scales.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    m = biases.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, -1)


def ggml_to_mlx_affine(
    blocks: np.ndarray, qtype: GGMLQuantizationType
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Q4_1/Q4_0/Q8_0 blocks (rows, bytes) → (words, f16 scales, f16 biases, bits) for MLX."""
    bits, bias_codes = AFFINE_TYPES[qtype]
    rows = blocks.shape[0]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = blocks.reshape(rows, -1, type_size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if qtype == Q.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        packed = blocks[..., 4:]
    else:
        # −8d and −128d are exact in f16: multiplying by a power of two only moves the exponent.
        m = (d.astype(np.float32) * bias_codes).astype(np.float16)
        packed = blocks[..., 2:]
    if bits == 4:
        codes = np.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=2)
    else:
        codes = (packed.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return _pack(codes.reshape(rows, -1), bits), d, m, bits
