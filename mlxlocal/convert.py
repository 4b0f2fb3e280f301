"""`convert`: a Hugging Face checkpoint → an MLX checkpoint that `mlx_lm.load` opens.

Streaming by design: source tensors are mapped lazily, each output tensor is evaluated on its
own and flushed to disk when its shard is full, so peak memory is about one shard.
"""

from __future__ import annotations

import hashlib
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
from .checkpoint.safetensors import load_lazy
from .checkpoint.shards import ShardWriter, parse_size
from .checkpoint.torch_bin import load_torch_bin
from .errors import MlxLocalError
from .models import ignored_settings, model_classes, normalize_config, read_config, source_dtype
from .progress import progress
from .sources import resolve_source, resolved_revision

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


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


def weight_files(src: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) of a checkpoint, preferring safetensors."""
    for kind, index_name, pattern in (
        ("safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = src / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise MlxLocalError(f"{index}: not a valid index ({e}); re-download it") from e
            missing = [n for n in names if not (src / n).exists()]
            if missing:
                raise MlxLocalError(
                    f"{src}: shard {missing[0]} named in {index_name} is missing; "
                    "the download is incomplete"
                )
            return kind, [src / n for n in names]
        files = sorted(src.glob(pattern))
        if files:
            return kind, files
    raise MlxLocalError(
        f"{src}: no *.safetensors or pytorch_model*.bin weights found; is the download complete?"
    )


@dataclass
class Source:
    """A checkpoint opened for conversion: fixed config, mlx-lm model skeleton, lazy tensors.

    `open_source` fills the first part without reading a tensor, so bad input fails before any
    output exists; `load_weights` adds the model and the lazily read, cast weights.
    """

    name: str | Path
    path: Path
    config: dict
    model_class: type
    args_class: type
    kind: str
    files: list[Path]
    notes: list[str]
    warnings: list[str]
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
    """Convert `src` (local folder, Hub repo id or .gguf file) into an MLX checkpoint at `out`."""
    if str(src).endswith(".gguf") and Path(src).is_file():
        from .gguf_import import convert_gguf

        return convert_gguf(src, out, dtype=dtype, shard_size=shard_size, force=force)
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


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise MlxLocalError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def open_source(src: str | Path, revision: str | None = None) -> Source:
    """Resolve `src` and read what it is, without touching a tensor."""
    src_dir = resolve_source(src, revision)
    config, notes = normalize_config(read_config(src_dir))
    model_class, args_class = model_classes(config)
    warnings = ignored_settings(config, args_class)
    kind, files = weight_files(src_dir)
    return Source(src, src_dir, config, model_class, args_class, kind, files, notes, warnings)


def load_weights(source: Source, staging: Path, dtype: str | None = None) -> None:
    """Map the source tensors lazily onto mlx-lm's names and cast them; nothing is read yet."""
    files = _stage_bin(source.files, staging) if source.kind == "bin" else source.files
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_lazy(f))
    config = source.config
    if "lm_head.weight" in weights and "tie_word_embeddings" not in config:
        # mlx-lm's Llama defaults to tied embeddings; HF's default is untied.
        config["tie_word_embeddings"] = False
        source.notes.append("tie_word_embeddings=false (the checkpoint has its own lm_head)")
    model = _build(source.model_class, source.args_class, config)
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
    writer = ShardWriter(tmp, weights, max_shard)
    try:
        for name in progress(list(weights), "converting", total=len(weights), unit="tensor"):
            writer.write(name, weights.pop(name))
            if after_write is not None:
                after_write(name)
    except BaseException:
        writer.abort()
        raise
    shards = writer.close({"total_parameters": source.parameters})
    shutil.rmtree(tmp / ".staging", ignore_errors=True)

    config = source.config
    config["dtype"] = source.dtype
    config.pop("torch_dtype", None)
    files = source.files if source.kind != "bin" else []
    config["mlxlocal"] = _provenance(source.name, source.path, files, source.notes)
    (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    for name in TOKENIZER_FILES:
        if (source.path / name).exists():
            shutil.copyfile(source.path / name, tmp / name)
    return shards, writer.total_bytes


def _build(model_class: type, args_class: type, config: dict):
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise MlxLocalError(
            f"config.json does not fit mlx-lm's {config['model_type']} model ({e!r}); "
            "check the config"
        ) from e


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _provenance(src: str | Path, src_dir: Path, files: list[Path], notes: list[str]) -> dict:
    hashed = sorted({*files, src_dir / "config.json"} | set(src_dir.glob("pytorch_model*.bin")))
    return {
        "source": str(src),
        "revision": resolved_revision(src_dir),
        "files": {p.name: file_sha256(p) for p in progress(hashed, "hashing", unit="file")},
        "config_fixes": notes,
        "mlxlocal_version": __version__,
    }
