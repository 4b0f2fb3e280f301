"""`convert`: a Hugging Face checkpoint → an MLX checkpoint that `mlx_lm.load` opens.

Streaming by design: source tensors are mapped lazily, each output tensor is evaluated on its
own and flushed to disk when its shard is full, so peak memory is about one shard.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__
from .checkpoint.atomic import atomic_directory, check_output
from .checkpoint.dtypes import DTYPES, check_dtype
from .checkpoint.files import copy_tokenizer_files, file_sha256, is_gguf_file, weight_files
from .checkpoint.fp8 import dequantize_fp8, fp8_scales
from .checkpoint.safetensors import load_lazy, read_header
from .checkpoint.shards import ShardWriter, parse_size
from .checkpoint.torch_bin import load_torch_bin, read_torch_bin_header
from .errors import MlxLocalError
from .models import (
    build_model,
    check_config_sizes,
    check_tokenizer_modules,
    ignored_settings,
    model_classes,
    normalize_config,
    read_config,
    source_dtype,
)
from .progress import progress
from .sources import resolve_source, resolved_revision


@dataclass
class ConvertResult:
    out: Path
    model_type: str
    dtype: str
    parameters: int
    shards: list[str]
    bytes: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Source:
    """A checkpoint opened for conversion: fixed config, mlx-lm model skeleton, lazy tensors.

    `open_source` fills the first part from headers, without reading a tensor, so bad input
    fails before any output exists; `load_weights` adds the model and the lazily read, cast
    weights.
    """

    name: str | Path
    path: Path
    config: dict
    kind: str
    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    notes: list[str]
    warnings: list[str]
    fp8_scales: dict[str, str] = field(default_factory=dict)
    model: Any = None
    weights: dict[str, mx.array] = field(default_factory=dict)
    dtype: str = "float32"
    parameters: int = 0


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    revision: str | None = None,
    force: bool = False,
) -> ConvertResult:
    """Convert `src` (local folder or Hub repo id) into an MLX checkpoint at `out`."""
    if is_gguf_file(src):
        raise MlxLocalError(
            f"{src} is a GGUF file: import it with mlxlocal.gguf_import.convert_gguf "
            "(the `mlxlocal convert` command does so itself)"
        )
    out = Path(out)
    check_output(out, force)
    check_dtype(dtype)
    max_shard = parse_size(shard_size)
    source = open_source(src, revision)
    with atomic_directory(out, force) as tmp:
        load_weights(source, tmp / ".staging", dtype)
        shards, total = write_checkpoint(tmp, source, max_shard)
    return ConvertResult(
        out,
        source.config["model_type"],
        source.dtype,
        source.parameters,
        shards,
        total,
        source.notes,
        source.warnings,
    )


def open_source(src: str | Path, revision: str | None = None) -> Source:
    """Resolve `src` and read what it is, without touching a tensor; a config the weight
    files cannot fill (more layers, larger sizes) fails here, before a model is built."""
    src_dir = resolve_source(src, revision)
    config, notes = normalize_config(read_config(src_dir))
    check_tokenizer_modules(src_dir)  # copied unread: the output must load
    warnings = ignored_settings(config, model_classes(config)[1])
    kind, files = weight_files(src_dir)
    shapes, dtypes = _tensor_table(kind, files)
    check_config_sizes(config, shapes)
    scales = fp8_scales(dtypes, shapes, config)
    return Source(src, src_dir, config, kind, files, shapes, notes, warnings, scales)


def _tensor_table(
    kind: str, files: list[Path]
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(name → shape, name → safetensors dtype) of every tensor in `files`, from their
    headers (no tensor data read); .bin files hold no dtype needing care, so none is listed."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for f in files:
        if kind == "bin":
            shapes.update({k: shape for k, (_, shape) in read_torch_bin_header(f).items()})
            continue
        header = read_header(f)[0]
        shapes.update({k: tuple(e["shape"]) for k, e in header.items()})
        dtypes.update({k: e["dtype"] for k, e in header.items()})
    return shapes, dtypes


def load_weights(source: Source, staging: Path, dtype: str | None = None) -> None:
    """Map the source tensors lazily onto mlx-lm's names and cast them; nothing is read yet."""
    files = _stage_bin(source.files, staging) if source.kind == "bin" else source.files
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_lazy(f))
    config = source.config
    if source.fp8_scales:
        weights = dequantize_fp8(weights, source.fp8_scales, config)
        config.pop("quantization_config", None)  # the weights are floats now
        source.notes.append(f"{len(source.fp8_scales)} FP8 tensors dequantized with their scales")
    if "lm_head.weight" in weights and "tie_word_embeddings" not in config:
        # mlx-lm's Llama defaults to tied embeddings; HF's default is untied.
        config["tie_word_embeddings"] = False
        source.notes.append("tie_word_embeddings=false (the checkpoint has its own lm_head)")
    model = build_model(config, source.shapes)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _check_weights(model, weights)

    target = dtype or source_dtype(config) or _first_float_dtype(weights)
    cast = getattr(model, "cast_predicate", lambda _: True)
    source.weights = {
        k: w.astype(DTYPES[target]) if mx.issubdtype(w.dtype, mx.floating) and cast(k) else w
        for k, w in sorted(weights.items())
    }
    source.model, source.dtype = model, target
    source.parameters = sum(w.size for w in source.weights.values())


def write_checkpoint(
    tmp: Path,
    source: Source,
    max_shard: int,
    after_write: Callable[[str], None] | None = None,
) -> tuple[list[str], int]:
    """Stream `source.weights` into shards (calling `after_write(name)` after each tensor), then
    write config.json with provenance and copy the tokenizer files; (shard names, bytes)."""
    weights = source.weights
    with ShardWriter(tmp, weights, max_shard, {"total_parameters": source.parameters}) as writer:
        for name in progress(list(weights), "converting", total=len(weights), unit="tensor"):
            writer.write(name, weights.pop(name))
            if after_write is not None:
                after_write(name)
    shutil.rmtree(tmp / ".staging", ignore_errors=True)

    config = source.config
    config["dtype"] = source.dtype
    config.pop("torch_dtype", None)
    config.pop("auto_map", None)  # custom model code: never run, not carried along
    files = source.files if source.kind != "bin" else []
    config["mlxlocal"] = _provenance(source.name, source.path, files, source.notes)
    (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    copy_tokenizer_files(source.path, tmp)
    return writer.names, writer.total_bytes


def _check_weights(model, weights: dict[str, mx.array]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise MlxLocalError(
            f"the weights do not match the {model.__class__.__module__.split('.')[-1]} "
            f"architecture ({what}, {len(missing)} missing, {len(extra)} unexpected); "
            "is config.json from the same checkpoint?"
        )
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise MlxLocalError(
                f"tensor {k} has shape {tuple(weights[k].shape)} but the config implies "
                f"{tuple(v.shape)}; is config.json from the same checkpoint?"
            )
        if not mx.issubdtype(weights[k].dtype, mx.floating):
            # The built model is unquantized: every parameter it holds is a float.
            raise MlxLocalError(
                f"tensor {k} is stored as {str(weights[k].dtype).split('.')[-1]}, not as "
                "floating-point weights; convert a float16, bfloat16 or float32 release"
            )


def _first_float_dtype(weights: dict[str, mx.array]) -> str:
    names = {v: k for k, v in DTYPES.items()}
    for w in weights.values():
        if w.dtype in names:
            return names[w.dtype]
    return "float32"


def _stage_bin(files: list[Path], staging: Path) -> list[Path]:
    """Rewrite .bin shards as safetensors, one at a time, so the rest streams the same way."""
    staging.mkdir()
    staged = []
    for f in progress(files, "reading .bin", unit="file"):
        tensors = load_torch_bin(f)
        mx.eval(tensors)
        path = staging / f"{f.stem}.safetensors"
        mx.save_safetensors(str(path), tensors)
        staged.append(path)
        del tensors
    return staged


def _provenance(src: str | Path, src_dir: Path, files: list[Path], notes: list[str]) -> dict:
    hashed = sorted({*files, src_dir / "config.json"} | set(src_dir.glob("pytorch_model*.bin")))
    return {
        "source": str(src),
        "revision": resolved_revision(src_dir),
        "files": {p.name: file_sha256(p) for p in progress(hashed, "hashing", unit="file")},
        "config_fixes": notes,
        "mlxlocal_version": __version__,
    }
