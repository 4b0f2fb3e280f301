"""The files of a checkpoint folder: which hold the weights, which the tokenizer, their hashes.

Every verb that reads a checkpoint or writes a new one next to it (convert, quantize, fuse,
export, info) asks here, so they agree on what a complete checkpoint is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..errors import MlxLocalError
from .inputs import JSONProblem, decode_json, read_json

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


def weight_files(src: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) of a checkpoint, preferring safetensors."""
    for kind, index_name, pattern in (
        ("safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = src / index_name
        if index.exists():
            names = _shard_names(index)
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


def _shard_names(index: Path) -> list[str]:
    """The shard files an index's `weight_map` names, checked to be plain file names."""
    weight_map = read_json(index, "index", "re-download it").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
    ):
        raise MlxLocalError(
            f"{index}: not a valid index (weight_map must map tensor names to shard file names "
            "in the same folder); re-download it"
        )
    return sorted(set(weight_map.values()))


def is_gguf_file(src: str | Path) -> bool:
    """Whether `src` names a single GGUF file (imported by `gguf_import`, not `convert`)."""
    return str(src).endswith(".gguf") and Path(src).is_file()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer, chat template and generation settings that `src` has into `dst`.

    A tokenizer config's `auto_map` (custom tokenizer code shipped with the checkpoint) is
    dropped: mlxlocal never runs it, and the output should not invite others to.
    """
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    settings = dst / "tokenizer_config.json"
    if settings.exists():
        try:
            data = decode_json(settings.read_bytes())
        except JSONProblem:
            return  # left as it is: loading it says what is wrong
        if isinstance(data, dict) and data.pop("auto_map", None) is not None:
            settings.write_text(json.dumps(data, indent=2))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks so multi-GB shards stay out of memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()
