"""Where a checkpoint comes from: a local folder, or a Hub repo id through the local HF cache.

Offline first: the cache is tried before the network, and the network only when the user has
not set HF_HUB_OFFLINE.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import MlxLocalError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name ending like a weight or data file is a path with a typo, never a Hub repo id.
FILE_SUFFIXES = {".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".jsonl", ".yaml"}
DOWNLOAD_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def is_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def resolve_source(src: str | Path, revision: str | None = None, download: bool = True) -> Path:
    """Return a local directory holding the checkpoint named by `src`.

    `builtin:tiny` is the tiny offline stand-in model; `download=False` only looks in caches.
    """
    if str(src).startswith("builtin:"):
        return builtin_model(str(src).removeprefix("builtin:"))
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MlxLocalError(f"{src} is a file: give the checkpoint's directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise MlxLocalError(f"{src}: permission denied; check the folder's permissions")
        return path
    why = _why_not_hub_id(str(src))
    if why is not None:
        raise MlxLocalError(f"{src}: no such folder ({why})")
    return _from_hub(str(src), revision, download)


def is_hub_id(src: str) -> bool:
    """Whether `src`, not an existing path, names a Hub repo: `org/name`, nothing path-like."""
    return _why_not_hub_id(src) is None


def _why_not_hub_id(src: str) -> str | None:
    """Why `src` is read as a (missing) path rather than a Hub repo id; None for a repo id.

    A missing `./x/y`, `x/model.gguf` or `runs/typo` (where `runs/` is a local folder) is a
    mistyped path: sending it to the Hub would only turn a typo into network traffic.
    """
    if (
        not REPO_ID.match(src)
        or src.startswith((".", "/", "~"))
        or Path(src).suffix.lower() in FILE_SUFFIXES
    ):
        return "a Hugging Face repo id is org/name, not a path or a file"
    org = src.split("/", 1)[0]
    if Path(org).exists():
        return f"{org}/ is a local folder, so this is a path, not a Hub repo id"
    return None


def cache_dir() -> Path:
    """Where mlxlocal keeps what it builds once: $MLXLOCAL_CACHE or ~/.cache/mlxlocal."""
    return Path(os.environ.get("MLXLOCAL_CACHE") or Path.home() / ".cache" / "mlxlocal")


def builtin_model(name: str) -> Path:
    """The HF-format checkpoint of a built-in model, built into the cache on first use."""
    from . import tiny
    from .checkpoint.atomic import atomic_directory

    if name != "tiny":
        raise MlxLocalError(f"builtin:{name}: no such built-in model (there is: builtin:tiny)")
    # Named by the builder's own source, so a changed builder never reuses a stale model.
    version = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    out = cache_dir() / f"tiny-{version}"
    if not (out / "config.json").exists():
        try:
            with atomic_directory(out, force=True) as tmp:
                tiny.build_tiny_checkpoint(tmp)
        except OSError as e:
            if not (out / "config.json").exists():  # not merely another process winning
                raise MlxLocalError(f"{out}: cannot build the tiny model there ({e})") from e
    return out


def _from_hub(repo_id: str, revision: str | None, download: bool = True) -> Path:
    """The cached (or, with `download`, downloaded) snapshot; every failure one line."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return _snapshot(repo_id, revision, download)
    except MlxLocalError:
        raise
    except HFValidationError as e:
        raise MlxLocalError(f"{repo_id}: not a Hugging Face repo id ({_first_line(e)})") from e
    except GatedRepoError as e:
        raise MlxLocalError(
            f"{repo_id} is gated: accept its licence on huggingface.co and run `hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise MlxLocalError(f"{repo_id}: no such repository on the Hub (check the name)") from e
    except RevisionNotFoundError as e:
        raise MlxLocalError(f"{repo_id}: no revision {revision!r} (check --revision)") from e
    except Exception as e:  # whatever the network stack raises: httpx, requests, a proxy hang-up
        raise MlxLocalError(
            f"{repo_id}: download failed ({type(e).__name__}: {_first_line(e)}); check the "
            "network, or give a local folder"
        ) from e


def _snapshot(repo_id: str, revision: str | None, download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True
            )
        )
        if (path / "config.json").exists():
            return path
    except LocalEntryNotFoundError:
        pass
    if not download:
        raise MlxLocalError(
            f"{repo_id} is not in the Hugging Face cache: download it first "
            f"(`hf download {repo_id}`), or give a local folder"
        )
    if is_offline():
        raise MlxLocalError(
            f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
            "unset HF_HUB_OFFLINE to download it, or give a local path"
        )
    path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    if not any(path.glob("*.safetensors")):
        patterns = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    return path


def _first_line(error: Exception) -> str:
    """An exception's message cut to its first non-empty line (Hub errors run to several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def resolved_revision(path: Path) -> str | None:
    """The commit hash of a Hub cache snapshot folder, or None for a plain folder."""
    parts = Path(path).resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None
