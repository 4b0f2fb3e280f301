"""What quantization cost, measured on text: perplexity, and KL divergence and top-1 agreement of
the next-token distribution against the unquantized model; per-layer sensitivity for choosing
bits. KL and top-1 come from `verify.compare_logits`, the same yardstick `convert --verify` uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import models
from .calibration_text import CALIBRATION, EVALUATION
from .checkpoint.inputs import read_bytes
from .errors import MlxLocalError
from .progress import progress
from .verify import compare_logits

MIN_TOKENS = 32  # per part: fewer and the averages are noise
WINDOW = 256  # tokens per forward pass


def read_text(path: str | Path) -> str:
    """A user's text file, refused with one line when it is empty or not text."""
    data = read_bytes(path, "text file")
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxLocalError(f"{path}: not a UTF-8 text file; give plain text") from e
    if not text.strip():
        raise MlxLocalError(f"{path}: the file is empty; give a few paragraphs of plain text")
    return text


def load_tokenizer(path: Path):
    """The tokenizer the text measurements need, with a way round when it cannot load."""
    try:
        return models.load_tokenizer(path)
    except MlxLocalError as e:
        raise MlxLocalError(f"{e}; pass --no-eval to skip the text measurements") from e


def token_parts(
    tokenizer, calib: str | Path | None, calib_tokens: int, eval_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(calibration, evaluation) token windows: the built-in passages, or the first and second
    half of the user's file, so the evaluation is never the text the bits were chosen on."""
    if calib is None:
        parts = [_encode(tokenizer, CALIBRATION), _encode(tokenizer, EVALUATION)]
        what = "the built-in text"
    else:
        ids = _encode(tokenizer, read_text(calib))
        parts = [ids[: len(ids) // 2], ids[len(ids) // 2 :]]
        what = f"{calib}"
    if min(len(p) for p in parts) < MIN_TOKENS:
        raise MlxLocalError(
            f"{what} has only {sum(len(p) for p in parts)} tokens; give at least "
            f"{2 * MIN_TOKENS} (half calibrates, half evaluates)"
        )
    return _windows(parts[0][:calib_tokens]), _windows(parts[1][:eval_tokens])


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of a long text, without transformers' warning about the model's max length
    (the text is cut into windows anyway)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer.encode(text)
    finally:
        hf_logging.set_verbosity(level)


def _windows(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + WINDOW] for i in range(0, len(ids), WINDOW) if len(ids[i : i + WINDOW]) > 1]


def for_measuring(model):
    """The model in float32 on MLX's CPU back end, where float16 matmuls are far slower
    (measured: 4-bit quantized ones ~30x); elsewhere as it is. Scales cast exactly."""
    if mx.default_device().type == mx.DeviceType.cpu:
        model.set_dtype(mx.float32)
        # Cast tensor by tensor, returning each source buffer to the OS, so the model is never
        # held in both dtypes (MLX would otherwise keep the freed buffers in its cache).
        for _, p in tree_flatten(model.parameters()):
            mx.eval(p)
            mx.clear_cache()
    return model


def logits(model, windows: list[list[int]]) -> list[np.ndarray]:
    """Float32 next-token logits of each window, each window run on its own."""
    out = []
    for ids in windows:
        out.append(np.array(model(mx.array([ids]))[0].astype(mx.float32)))
    return out


def perplexity(window_logits: list[np.ndarray], windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for lg, ids in zip(window_logits, windows, strict=True):
        loss = nn.losses.cross_entropy(mx.array(lg[:-1]), mx.array(ids[1:]), reduction="sum")
        nll, n = nll + loss.item(), n + len(ids) - 1
    return math.exp(nll / n)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """`compare_logits` over windows: means weighted by positions, the max over all."""
    parts = [(len(r), compare_logits(r, c)) for r, c in zip(reference, candidate, strict=True)]
    total = sum(n for n, _ in parts)
    return {
        "mean_kl": sum(n * p["mean_kl"] for n, p in parts) / total,
        "top1_agreement": sum(n * p["top1_agreement"] for n, p in parts) / total,
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for _, p in parts),
    }


def layer_sensitivity(
    model, options: dict[str, list], windows: list[list[int]], reference: list[np.ndarray]
) -> dict[str, list[float]]:
    """Mean KL(unquantized || model with only that layer quantized) per layer and option.

    `options[path]` lists quant_plan.Spec (or None: unquantized, no damage). The layer is
    swapped for its quantized version, the text run, and the original put back.
    """
    modules = dict(model.named_modules())
    damage: dict[str, list[float]] = {}
    for path, specs in progress(list(options.items()), "measuring sensitivity", unit="layer"):
        original = modules[path]
        row = []
        for spec in specs:
            if spec is None:
                row.append(0.0)
                continue
            quantized = original.to_quantized(spec.group_size, spec.bits, spec.mode)
            model.update_modules(tree_unflatten([(path, quantized)]))
            row.append(compare(reference, logits(model, windows))["mean_kl"])
        model.update_modules(tree_unflatten([(path, original)]))
        damage[path] = row
    return damage
