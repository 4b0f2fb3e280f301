"""`convert`: a Hugging Face checkpoint → an MLX checkpoint that `mlx_lm.load` opens.

Streaming by design: source tensors are mapped lazily, each output tensor is evaluated on its
own and flushed to disk when its shard is full, so peak memory is about one shard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

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
    out = Path(out)
    check_output(out, force)
    if dtype is not None and dtype not in DTYPES:
        raise MlxLocalError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    max_shard = parse_size(shard_size)
    src_dir = resolve_source(src, revision)
    config, notes = normalize_config(read_config(src_dir))
    model_class, args_class = model_classes(config)
    warnings = ignored_settings(config, args_class)
    kind, files = weight_files(src_dir)

    with atomic_directory(out, force) as tmp:
        if kind == "bin":
            files = _stage_bin(files, tmp / ".staging")
        weights: dict[str, mx.array] = {}
        for f in files:
            weights.update(load_lazy(f))
        if "lm_head.weight" in weights and "tie_word_embeddings" not in config:
            # mlx-lm's Llama defaults to tied embeddings; HF's default is untied.
            config["tie_word_embeddings"] = False
            notes.append("tie_word_embeddings=false (the checkpoint has its own lm_head)")
        model = _build(model_class, args_class, config)
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        _check_weights(model, weights)

        target = dtype or source_dtype(config) or _first_float_dtype(weights)
        cast = getattr(model, "cast_predicate", lambda _: True)
        weights = {
            k: w.astype(DTYPES[target]) if mx.issubdtype(w.dtype, mx.floating) and cast(k) else w
            for k, w in sorted(weights.items())
        }
        n_params = sum(w.size for w in weights.values())
        writer = ShardWriter(tmp, weights, max_shard)
        try:
            for name in progress(list(weights), "converting", total=len(weights), unit="tensor"):
                writer.write(name, weights.pop(name))
        except BaseException:
            writer.abort()
            raise
        shards = writer.close({"total_parameters": n_params})
        shutil.rmtree(tmp / ".staging", ignore_errors=True)

        config["dtype"] = target
        config.pop("torch_dtype", None)
        config["mlxlocal"] = _provenance(src, src_dir, files if kind != "bin" else [], notes)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        for name in TOKENIZER_FILES:
            if (src_dir / name).exists():
                shutil.copyfile(src_dir / name, tmp / name)
        total = writer.total_bytes

    return ConvertResult(
        out, config["model_type"], target, n_params, shards, total, notes, warnings
    )


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
