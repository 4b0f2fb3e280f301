"""`export gguf`: an MLX checkpoint (optionally with its adapter fused in) → one GGUF file that
llama.cpp, Ollama and LM Studio load; or an adapter alone → a GGUF LoRA adapter.

Written with the `gguf` package (llama.cpp's own writer): the header and tensor table are
planned from shapes first, then each tensor is computed, converted and written on its own, so
peak memory is one tensor. What differs per family (GGUF arch name, whether llama.cpp wants
Q/K rows permuted) comes from the family specs in convert/*.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from ..adapters.files import Adapter, check_fits, linear_shapes
from ..adapters.peft import read_any
from ..checkpoint.atomic import atomic_file, check_output
from ..checkpoint.dtypes import DTYPES
from ..checkpoint.files import weight_files
from ..checkpoint.gguf import FLOAT_DTYPES, GROUP, mlx_q4_to_q4_1
from ..checkpoint.gguf_names import gguf_name, name_map, permute_heads, permute_qk
from ..checkpoint.safetensors import load_lazy
from ..choices import GGUF_TYPES
from ..errors import MlxLocalError
from ..models import check_config_sizes, context_length, read_config, tokenizer_module_problem
from ..progress import progress
from ..resources import family_spec, family_specs
from .gguf_tokenizer import add_tokenizer

Q = gguf.GGMLQuantizationType
TYPES = {name: Q[name.upper()] for name in GGUF_TYPES}
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}
_FLOAT_TYPES = {DTYPES[name]: qtype for qtype, name in FLOAT_DTYPES.items()}


@dataclass
class GGUFExport:
    out: Path
    arch: str
    type: str
    tensors: int
    bytes: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Planned:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # logical (rows, cols) in numpy order
    produce: Callable[[], np.ndarray]  # float32 values, or raw bytes when `raw`
    raw: bool = False


def gguf_spec(config: dict) -> dict:
    """The family spec of a config's model type, if the family can be exported to GGUF."""
    spec = family_spec(config["model_type"]) or {}
    if not spec.get("gguf_export"):
        ok = sorted(k for k, s in family_specs().items() if s and s.get("gguf_export"))
        raise MlxLocalError(
            f"GGUF export of {config['model_type']} models is not supported yet "
            f"(supported: {', '.join(ok)})"
        )
    return spec


def export_gguf(
    model: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    type: str = "auto",
    force: bool = False,
) -> GGUFExport:
    """Write the MLX checkpoint `model` (with `adapter` fused in, if given) as a GGUF file.

    `type` is the GGML type of the 2-D weights; `auto` keeps the checkpoint's dtype, repacks
    4-bit group-32 models as Q4_1 and turns other quantized models into Q8_0.
    """
    model, out = Path(model), Path(out)
    check_output(out, force)
    if type != "auto" and type not in TYPES:
        raise MlxLocalError(f"unknown GGUF type {type!r}: use auto or one of {', '.join(TYPES)}")
    config = read_config(model)
    spec = gguf_spec(config)
    weights: dict[str, mx.array] = {}
    for f in weight_files(model)[1]:
        weights.update(load_lazy(f))
    # Per-layer metadata is planned from the config: bound it by what the files hold first.
    check_config_sizes(config, {name: w.shape for name, w in weights.items()})
    fused = read_any(adapter) if adapter else None
    if fused:
        check_fits(fused, linear_shapes(model, config), model)
    notes: set[str] = set()  # filled while planning and while writing
    if problem := tokenizer_module_problem(model):  # mlx-lm's key only; no GGUF field holds it
        notes.add(f"not carried into the GGUF, which has no such setting: {problem}")
    plan = _plan_tensors(weights, config, spec, type, fused, notes)
    qtype = _file_type(plan, type)
    with atomic_file(out, force) as tmp:
        writer = gguf.GGUFWriter(tmp, spec["gguf_arch"])
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(model.resolve().name)
            writer.add_file_type(FILE_TYPES[qtype])
            if qtype not in (Q.F32, Q.F16, Q.BF16):
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hparams(writer, config)
            rows = weights["model.embed_tokens.weight"].shape[0]
            notes.update(add_tokenizer(writer, model, rows, config))
            total = _write(writer, plan)
        finally:
            writer.close()
    name = "auto→" + qtype.name.lower() if type == "auto" else type
    return GGUFExport(out, spec["gguf_arch"], name, len(plan), total, sorted(notes))


def export_gguf_adapter(
    adapter: str | Path, model: str | Path, out: str | Path, *, force: bool = False
) -> GGUFExport:
    """Write a LoRA adapter as a GGUF adapter (general.type=adapter) for `model`'s GGUF export.

    llama.cpp applies W·x + (alpha/r)·B·A·x at run time: the tensors are PEFT's orientation
    (A: r×in, B: out×r) in F32, with `adapter.lora.alpha` = scale·r.
    """
    model, out = Path(model), Path(out)
    check_output(out, force)
    config = read_config(model)
    spec = gguf_spec(config)
    lora = read_any(adapter)
    check_fits(lora, linear_shapes(model, config), model)
    if lora.kind != "lora":
        raise MlxLocalError(
            "llama.cpp's GGUF adapters are LoRA only; export a DoRA adapter fused into the "
            "model instead (`mlxlocal export gguf MODEL OUT.gguf --adapter DIR`)"
        )
    names = name_map(spec, config)
    plan = []
    for module, leaves in sorted(lora.modules.items()):
        base = gguf_name(names, module + ".weight")
        a, b = leaves["lora_a"], leaves["lora_b"]
        heads = permute_heads(spec, config, base)
        plan.append(_Planned(base + ".lora_a", Q.F32, (lora.rank, a.shape[0]), _f32(a.T)))
        plan.append(_Planned(base + ".lora_b", Q.F32, (b.shape[1], lora.rank), _f32(b.T, heads)))
    with atomic_file(out, force) as tmp:
        writer = gguf.GGUFWriter(tmp, spec["gguf_arch"])
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.scale * lora.rank)
            total = _write(writer, plan)
        finally:
            writer.close()
    return GGUFExport(out, spec["gguf_arch"], "f32", len(plan), total)


def _write(writer: gguf.GGUFWriter, plan: list[_Planned]) -> int:
    total = 0
    for p in plan:
        if p.qtype in (Q.F32, Q.F16):
            dtype = np.float32 if p.qtype == Q.F32 else np.float16
            nbytes = math.prod(p.shape) * np.dtype(dtype).itemsize
            writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), nbytes)
        else:
            nbytes = math.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype))
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, p.qtype)
        total += nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in progress(plan, "writing GGUF", unit="tensor"):
        data = p.produce()
        if not p.raw:
            data = _encode(data, p.qtype)
        writer.write_tensor_data(data)
        del data
        mx.clear_cache()
    return total


def _encode(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.BF16:
        return np.asarray(mx.array(values).astype(mx.bfloat16).view(mx.uint16))
    return gguf.quants.quantize(values, qtype)


def _file_type(plan: list[_Planned], requested: str) -> gguf.GGMLQuantizationType:
    if requested != "auto":
        return TYPES[requested]
    counts: dict = {}
    for p in plan:
        if len(p.shape) == 2:
            counts[p.qtype] = counts.get(p.qtype, 0) + math.prod(p.shape)
    return max(counts, key=counts.get)


def _f32(array: mx.array, heads: int | None = None) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        values = np.asarray(array.astype(mx.float32))
        return permute_qk(values, heads) if heads else values

    return produce


def _plan_tensors(
    weights: dict[str, mx.array],
    config: dict,
    spec: dict,
    requested: str,
    adapter: Adapter | None,
    notes: set[str],
) -> list[_Planned]:
    names = name_map(spec, config)
    quant = config.get("quantization") or {}
    plan = []
    for key in sorted(weights, key=_natural):
        module, _, leaf = key.rpartition(".")
        if leaf in ("scales", "biases") and f"{module}.scales" in weights:
            continue
        name = gguf_name(names, key)
        heads = permute_heads(spec, config, name)
        adapted = adapter is not None and leaf == "weight" and module in adapter.modules
        adapt = partial(adapter.fused_weight, module) if adapted else None
        w = weights[key]
        if f"{module}.scales" in weights and leaf == "weight":
            layer = quant.get(module) if isinstance(quant.get(module), dict) else quant
            q = (w, weights[f"{module}.scales"], weights.get(f"{module}.biases"), layer)
            plan.append(_plan_quantized(name, q, requested, heads, adapt, notes))
            continue
        shape = tuple(w.shape)
        qtype = _target(shape, _FLOAT_TYPES.get(w.dtype, Q.F32), requested, notes)
        value = adapt(w) if adapt else w
        if key.endswith("norm.weight") and spec.get("gguf_norm_offset"):
            value = value.astype(mx.float32) + spec["gguf_norm_offset"]  # Gemma: 1 + w
        plan.append(_Planned(name, qtype, shape, _f32(value, heads)))
    plan += _rope_freqs(config)
    return plan


def _plan_quantized(name, q, requested, heads, adapt, notes) -> _Planned:
    words, scales, biases, layer = q
    bits, group, mode = layer["bits"], layer["group_size"], layer.get("mode", "affine")
    shape = (words.shape[0], words.shape[1] * 32 // bits)
    repack = bits == 4 and group == GROUP and mode == "affine" and adapt is None
    if requested in ("auto", "q4_1") and repack:

        def produce() -> np.ndarray:
            blocks = mlx_q4_to_q4_1(np.asarray(words), *_f16_exact(scales, biases, notes))
            return permute_qk(blocks, heads) if heads else blocks

        return _Planned(name, Q.Q4_1, shape, produce, raw=True)

    qtype = _target(shape, Q.Q8_0, requested, notes)
    if adapt is None:
        again = "re-quantized to" if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1) else "stored as"
        notes.add(
            f"the {bits}-bit (group {group}) MLX weights were dequantized and {again} "
            f"{qtype.name.lower()}; only 4-bit group-32 models repack losslessly (to q4_1)"
        )
    dense = mx.dequantize(
        words,
        scales.astype(mx.float32),
        None if biases is None else biases.astype(mx.float32),
        group_size=group,
        bits=bits,
        mode=mode,
    )
    value = adapt(dense) if adapt else dense
    return _Planned(name, qtype, shape, _f32(value, heads))


def _f16_exact(scales: mx.array, biases: mx.array, notes: set[str]) -> tuple:
    s, b = np.asarray(scales.astype(mx.float32)), np.asarray(biases.astype(mx.float32))
    if not (
        np.array_equal(s.astype(np.float16).astype(np.float32), s)
        and np.array_equal(b.astype(np.float16).astype(np.float32), b)
    ):
        notes.add("some MLX scales/biases were rounded to float16 to fit GGML's q4_1 blocks")
    return s, b


def _target(shape: tuple, native, requested: str, notes: set[str]):
    """GGML type of one tensor: norms and other 1-D tensors stay F32, as llama.cpp expects."""
    if len(shape) == 1:
        return Q.F32
    qtype = native if requested == "auto" else TYPES[requested]
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and shape[-1] % GROUP:
        notes.add(f"rows of {shape[-1]} values are not a multiple of {GROUP}: kept as f16")
        return Q.F16
    return qtype


def _rope_freqs(config: dict) -> list[_Planned]:
    """Llama 3 rope scaling lives in a `rope_freqs` tensor of per-frequency divisors; Phi-3's
    longrope in `rope_factors_short`/`_long`, which llama.cpp picks between by context size."""
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in _LONGROPE:
        return [
            _Planned(f"rope_factors_{n}.weight", Q.F32, (len(f),), _f32(mx.array(f)))
            for n, f in (("long", scaling["long_factor"]), ("short", scaling["short_factor"]))
        ]
    if kind != "llama3":
        return []
    from mlx_lm.models.rope_utils import initialize_rope

    dims = _head_dim(config)
    base = config.get("rope_theta", 10000.0)
    rope = initialize_rope(dims, base, False, scaling, config.get("max_position_embeddings"))
    plain = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    factors = rope._freqs / plain
    return [_Planned("rope_freqs.weight", Q.F32, (dims // 2,), _f32(factors))]


_LONGROPE = ("longrope", "su")


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    heads = config["num_attention_heads"]
    head_dim = _head_dim(config)
    writer.add_context_length(context_length(config) or 4096)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 1.0)))
    writer.add_vocab_size(config["vocab_size"])
    if head_dim * heads != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind in _LONGROPE:
        original = config.get("original_max_position_embeddings") or scaling.get(
            "original_max_position_embeddings"
        )
        factor = config["max_position_embeddings"] / original
        default = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        writer.add_rope_scaling_attn_factors(scaling.get("attention_factor") or default)
        writer.add_rope_scaling_orig_ctx_len(original)
    elif kind not in ("default", "llama3"):
        raise MlxLocalError(
            f"rope scaling {kind!r} is not supported by GGUF export yet "
            "(default, linear, llama3, longrope)"
        )
    for key, add in (
        ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
        ("final_logit_softcapping", writer.add_final_logit_softcapping),
    ):
        if config.get(key):
            add(config[key])
    if config["model_type"] == "gemma2" and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])


def _natural(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))
