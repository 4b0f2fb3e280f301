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
            data = json.loads(settings.read_text())
        except (UnicodeDecodeError, ValueError, RecursionError):
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
