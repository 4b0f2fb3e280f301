"""Where each MLX tensor lives in a GGUF file: llama.cpp's tensor names and its Q/K row order.

Shared by GGUF export and import, so a round trip puts every tensor back where it came from.
"""

from __future__ import annotations

import gguf
import numpy as np

from ..errors import MlxLocalError


def name_map(spec: dict, config: dict) -> gguf.TensorNameMap:
    """llama.cpp's tensor-name map for a family spec's GGUF architecture and the config's depth."""
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[spec["gguf_arch"]]
    return gguf.get_tensor_name_map(arch, config["num_hidden_layers"])


def gguf_name(names: gguf.TensorNameMap, key: str) -> str:
    """The GGUF name of the MLX tensor `key`, or an error when llama.cpp has none."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise MlxLocalError(f"tensor {key} has no GGUF counterpart; cannot export this model")
    return name


def permute_heads(spec: dict, config: dict, gguf_name: str) -> int | None:
    """Heads whose Q/K rows llama.cpp's interleaved RoPE wants reordered, or None."""
    if not spec.get("permute_qk"):
        return None
    if ".attn_q." in gguf_name:
        return config["num_attention_heads"]
    if ".attn_k." in gguf_name:
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def permute_qk(rows: np.ndarray, heads: int, inverse: bool = False) -> np.ndarray:
    """Hugging Face's rotate-half Q/K row order ↔ llama.cpp's interleaved pairs, per head.

    Works on any array whose first axis is the output rows (weights, biases, GGML blocks).
    """
    shape = rows.shape
    split = (heads, shape[0] // heads // 2, 2) if inverse else (heads, 2, shape[0] // heads // 2)
    return rows.reshape(*split, *shape[1:]).swapaxes(1, 2).reshape(shape)
