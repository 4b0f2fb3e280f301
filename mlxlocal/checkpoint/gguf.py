"""GGUF at the byte level: validated reading, and exact moves between GGML blocks and MLX's
affine quantization.

GGML's Q4_1 block (32 weights: f16 scale d, f16 minimum m, 4-bit codes, w = d·q + m) is MLX's
4-bit affine quantization with group size 32 (w = scale·q + bias), stored in another order.
Q4_0 (w = d·(q − 8)) and Q8_0 (w = d·q, q signed) are affine too, with bias −8d and −128d, so
all three move between the formats without touching a single weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from ..errors import MlxLocalError

Q = GGMLQuantizationType
# GGML types MLX holds natively: float dtypes (stored as numpy dtype, named as in DTYPES), or
# (bits, bias in units of the scale).
FLOAT_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}
FLOAT_DTYPES = {Q.F32: "float32", Q.F16: "float16", Q.BF16: "bfloat16"}
AFFINE_TYPES = {Q.Q4_1: (4, None), Q.Q4_0: (4, -8), Q.Q8_0: (8, -128)}
GROUP = 32


def open_gguf(path: Path) -> GGUFReader:
    """A GGUF reader whose every tensor is non-empty and known to lie inside the file."""
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise MlxLocalError(
            f"{path}: not a readable GGUF file ({e}); is it complete? re-download it"
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:
        if not all(int(n) > 0 for n in t.shape):
            raise MlxLocalError(
                f"{path}: tensor {t.name} has shape {[int(n) for n in t.shape][:8]}, with an "
                "empty dimension; the file is corrupt — re-download it"
            )
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise MlxLocalError(
                f"{path}: tensor {t.name} runs past the end of the file ({end} > {size} bytes); "
                "the file is truncated, re-download it"
            )
    return reader


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
