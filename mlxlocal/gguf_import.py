"""`convert model.gguf OUT`: a llama.cpp GGUF file → an MLX checkpoint that mlx-lm loads.

F32/F16/BF16 tensors load as they are; Q4_0/Q4_1/Q8_0 blocks become MLX's own 4/8-bit affine
quantization (group 32) without changing a weight; other GGML types (K-quants…) are
dequantized through the gguf package. Q/K rows are put back into Hugging Face's order where the
family spec says llama.cpp permuted them. Streaming: one tensor in memory at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .checkpoint.atomic import atomic_directory, check_output
from .checkpoint.dtypes import DTYPES, check_dtype
from .checkpoint.files import file_sha256
from .checkpoint.gguf import (
    AFFINE_TYPES,
    FLOAT_DTYPES,
    FLOAT_TYPES,
    REQUIRED,
    get_field,
    ggml_to_mlx_affine,
    open_gguf,
)
from .checkpoint.gguf_names import gguf_name, name_map, permute_heads, permute_qk
from .checkpoint.gguf_tokenizer import write_tokenizer_files
from .checkpoint.shards import ShardWriter, parse_size
from .convert import ConvertResult
from .errors import MlxLocalError
from .models import build_model, longest_numbered_list
from .progress import progress
from .resources import family_specs

Q = gguf.GGMLQuantizationType


@dataclass
class _Layout:
    """What ShardWriter needs to plan shards before any tensor is read."""

    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


def convert_gguf(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
) -> ConvertResult:
    """Convert the GGUF file `src` into an MLX checkpoint directory `out`."""
    src, out = Path(src), Path(out)
    check_output(out, force)
    try:
        return _convert(src, out, dtype, shard_size, force)
    except MlxLocalError as e:  # metadata checks say "the GGUF …": name the file
        if str(e).startswith("the GGUF"):
            raise MlxLocalError(f"{src}: {e}") from None
        raise


def _convert(
    src: Path, out: Path, dtype: str | None, shard_size: str | int, force: bool
) -> ConvertResult:
    reader, fields = open_gguf(src)
    tensors = {t.name: t for t in reader.tensors}
    model_type, spec = _family(fields, src)
    config = _config(fields, tensors, model_type, spec["gguf_arch"])
    warnings: list[str] = []
    target = dtype or _float_dtype(tensors)
    check_dtype(target)
    blocks = longest_numbered_list(tensors)
    if config["num_hidden_layers"] > blocks:  # else build_model blames a config.json
        raise MlxLocalError(
            f"{src}: {spec['gguf_arch']}.block_count is {config['num_hidden_layers']} but the "
            f"file holds tensors of {blocks} blocks; the file is corrupt — re-download it"
        )
    model = build_model(config, {name: t.shape for name, t in tensors.items()})
    names = name_map(spec, config)
    plan: dict[str, tuple] = {}
    layout: dict[str, _Layout] = {}
    quant: dict[str, dict] = {}
    for key, value in sorted(tree_flatten(model.parameters())):
        name = gguf_name(names, key)
        if name not in tensors:
            raise MlxLocalError(f"{src}: tensor {name} ({key}) is missing; is the file complete?")
        t = tensors.pop(name)
        heads = permute_heads(spec, config, name)
        shape = tuple(value.shape)
        stored = tuple(int(n) for n in reversed(t.shape))  # GGML lists the fastest axis first
        if stored != shape:
            raise MlxLocalError(
                f"{src}: tensor {name} has shape {list(stored)[:8]} but the file's metadata makes "
                f"it {list(shape)}; the file is corrupt — re-download it"
            )
        module = key.rpartition(".")[0]
        if t.tensor_type in AFFINE_TYPES and len(shape) == 2:
            bits = AFFINE_TYPES[t.tensor_type][0]
            quant[module] = {"group_size": 32, "bits": bits}
            groups = (shape[0], shape[1] // 32)
            layout[key] = _Layout((shape[0], shape[1] * bits // 32), mx.uint32)
            layout[f"{module}.scales"] = _Layout(groups, DTYPES[target])
            layout[f"{module}.biases"] = _Layout(groups, DTYPES[target])
        else:
            if t.tensor_type not in FLOAT_TYPES:
                _check_dequantizable(t, src)
                warnings.append(
                    f"{t.tensor_type.name} tensors were dequantized to {target} "
                    "(MLX has no native form of them)"
                )
            layout[key] = _Layout(shape, DTYPES[target])
        plan[key] = (t, heads, shape)
    if "rope_freqs.weight" in tensors:
        _llama3_rope(config, tensors.pop("rope_freqs.weight"), src)
    if tensors:
        raise MlxLocalError(
            f"{src}: unexpected tensors {sorted(tensors)[:3]}; is the architecture right?"
        )
    if quant:
        counts = [q["bits"] for q in quant.values()]
        bits = max(set(counts), key=counts.count)
        config["quantization"] = {"group_size": 32, "bits": bits, "mode": "affine"}
        config["quantization"].update({m: q for m, q in quant.items() if q["bits"] != bits})
    warnings = sorted(set(warnings))

    n_params = sum(math.prod(s) for _, _, s in plan.values())
    with atomic_directory(out, force) as tmp:
        metadata = {"total_parameters": n_params}
        with ShardWriter(tmp, layout, parse_size(shard_size), metadata) as writer:
            for key, (t, heads, shape) in progress(list(plan.items()), "converting", unit="tensor"):
                for name, array in _tensor(key, t, heads, shape, DTYPES[target]):
                    writer.write(name, array)
        config["dtype"] = target
        config["mlxlocal"] = {"source": str(src), "files": {src.name: file_sha256(src)}}
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        write_tokenizer_files(fields, tmp)
    return ConvertResult(
        out, model_type, target, n_params, writer.names, writer.total_bytes, [], warnings
    )


def _family(fields: dict, src: Path) -> tuple[str, dict]:
    kind = get_field(fields, "general.type", "text", "model")
    if kind != "model":
        raise MlxLocalError(f"{src} is a GGUF {kind}, not a model; convert the base model instead")
    arch = get_field(fields, "general.architecture", "text")
    specs = {
        t: s
        for t, s in family_specs().items()
        if s and s.get("gguf_export") and s.get("gguf_import", True)
    }
    matches = sorted(specs, key=lambda t: t != arch)
    for model_type in matches:
        if specs[model_type]["gguf_arch"] == arch:
            return model_type, specs[model_type]
    known = sorted({s["gguf_arch"] for s in specs.values()})
    raise MlxLocalError(
        f"{src}: GGUF architecture {arch!r} is not supported (supported: {', '.join(known)})"
    )


def _config(fields: dict, tensors: dict, model_type: str, arch: str) -> dict:
    def get(key: str, kind: str, default=REQUIRED):
        return get_field(fields, f"{arch}.{key}", kind, default)

    if "token_embd.weight" not in tensors:
        raise MlxLocalError("the GGUF has no token_embd.weight tensor; is the file complete?")
    heads = get("attention.head_count", "count")
    hidden = get("embedding_length", "count")
    head_dim = get("attention.key_length", "count", hidden // heads)
    if head_dim < 1 or head_dim % 2:
        raise MlxLocalError(
            f"the GGUF's attention heads are {head_dim} wide, but RoPE rotates pairs: a "
            "positive even width; the file is corrupt — re-download it"
        )
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count", "count"),
        "intermediate_size": get("feed_forward_length", "count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", "count", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", "positive"),
        "rope_theta": get("rope.freq_base", "positive", 10000.0),
        "max_position_embeddings": get("context_length", "count"),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    if model_type == "llama" and "blk.0.attn_q.bias" in tensors:
        config["attention_bias"] = True
    scaling = get("rope.scaling.type", "text", "none")
    if scaling == "linear":
        factor = get("rope.scaling.factor", "positive")
        config["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": factor}
    elif scaling != "none":
        raise MlxLocalError(
            f"the GGUF's rope scaling {scaling[:40]!r} is not supported for import "
            "(supported: none, linear)"
        )
    for key in ("bos", "eos", "padding"):
        value = get_field(fields, f"tokenizer.ggml.{key}_token_id", "integer", None)
        if value is not None:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = value
    return config


def _llama3_rope(config: dict, tensor, src: Path) -> None:
    """Llama 3 rope scaling back from llama.cpp's `rope_freqs` (one divisor per frequency).

    GGUF records no scaling parameters, only their result: 1 for short wavelengths λ, `factor`
    for long ones, and between them 1/f = (1-s)/factor + s with s = (old/λ - low)/(high - low),
    linear in 1/λ. Only that line matters, so low_freq_factor = 1 loses nothing; with fewer
    than two points on it, high_freq_factor = 4 (Meta's value) is taken. The result is checked
    by recomputing the divisors as mlx-lm does.
    """
    from mlx_lm.models.rope_utils import initialize_rope

    dims, base = config["head_dim"], config["rope_theta"]
    found = np.asarray(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), float)
    found = found.reshape(-1)
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    if found.shape != wavelen.shape or not np.all(np.isfinite(found)) or found.min() <= 0:
        raise MlxLocalError(
            f"{src}: rope_freqs has {found.size} values, not {wavelen.size} positive ones; the "
            "file is corrupt — re-download it"
        )
    factor = float(found.max())
    if factor - 1 < 1e-6:
        return  # no scaling at all
    middle = (found > 1 + 1e-6) & (found < factor * (1 - 1e-6))
    s = (1 / found[middle] - 1 / factor) / (1 - 1 / factor)
    low, high = 1.0, 4.0
    if middle.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[middle], s, 1)
        span = -1 / intercept if intercept < 0 else 0.0
        high, old = low + span, slope * span
    elif middle.sum() == 1:
        old = float(wavelen[middle][0] * ((high - low) * s[0] + low))
    else:  # a sharp step: any old context between the two bands
        longest_short = wavelen[found <= 1 + 1e-6].max(initial=0.0)
        old = float(wavelen[found >= factor * (1 - 1e-6)].min()) * (1 - 1e-6)
        high = max(min(high, old / max(longest_short, 1e-9) * (1 - 1e-6)), low + 1e-3)
    plain = base ** (np.arange(0, dims, 2) / dims)
    # The fit gives 8191.9998 for Meta's 8192: the round values first, if they reproduce.
    for f, h, o in ((round(factor, 3), round(high, 3), round(old)), (factor, high, old)):
        scaling = {
            "rope_type": "llama3",
            "type": "llama3",
            "factor": f,
            "low_freq_factor": low,
            "high_freq_factor": float(h),
            "original_max_position_embeddings": o if isinstance(o, int) else float(o),
        }
        if h > low and o > 0:
            rope = initialize_rope(dims, base, False, scaling, config["max_position_embeddings"])
            if np.allclose(np.array(rope._freqs) / plain, found, rtol=1e-4, atol=0):
                config["rope_scaling"] = scaling
                return
    raise MlxLocalError(
        f"{src}: its rope_freqs are not Llama 3 rope scaling (no factor, low/high frequency "
        "factors and original context reproduce them); importing it is not supported"
    )


def _float_dtype(tensors: dict) -> str:
    """The dtype of the largest float tensors (float16 when all 2-D weights are quantized)."""
    sizes: dict[str, int] = {}
    for t in tensors.values():
        if len(t.shape) == 2:
            name = FLOAT_DTYPES.get(t.tensor_type, "float16")
            sizes[name] = sizes.get(name, 0) + int(t.n_elements)
    return max(sizes, key=sizes.get) if sizes else "float16"


def _check_dequantizable(t, src: Path) -> None:
    block = np.zeros(gguf.GGML_QUANT_SIZES[t.tensor_type][1], np.uint8)
    try:
        gguf.quants.dequantize(block, t.tensor_type)
    except NotImplementedError as e:
        raise MlxLocalError(
            f"{src}: tensor {t.name} has GGML type {t.tensor_type.name}, which cannot be read "
            "yet; convert from another quantization of the model"
        ) from e


def _tensor(key: str, t, heads: int | None, shape: tuple, dtype: mx.Dtype):
    """(name, array) pairs MLX stores for one GGUF tensor, Q/K rows back in HF order."""
    raw = np.asarray(t.data)
    if t.tensor_type in AFFINE_TYPES and len(shape) == 2:
        blocks = raw.reshape(shape[0], -1)
        if heads:
            blocks = permute_qk(blocks, heads, inverse=True)
        words, scales, biases, _ = ggml_to_mlx_affine(blocks, t.tensor_type)
        module = key.rpartition(".")[0]
        yield key, mx.array(words)
        yield f"{module}.scales", mx.array(scales).astype(dtype)
        yield f"{module}.biases", mx.array(biases).astype(dtype)
        return
    if t.tensor_type in FLOAT_TYPES:
        values = mx.array(raw.view(FLOAT_TYPES[t.tensor_type]).reshape(shape))
        if t.tensor_type == Q.BF16:
            values = values.view(mx.bfloat16)
    else:
        values = mx.array(gguf.quants.dequantize(raw, t.tensor_type).reshape(shape))
    if heads:
        values = mx.array(permute_qk(np.asarray(values.astype(mx.float32)), heads, inverse=True))
    yield key, values.astype(dtype)
