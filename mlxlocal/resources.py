"""The data folders installed with the package: built-in recipes and model-family specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import MlxLocalError

# Installed name → folder at the top of the source tree (see pyproject's package-dir).
_FOLDERS = {"recipes": "recipes", "families": "convert"}


def builtin_dir(name: str) -> Path:
    """Folder of built-in `recipes` or `families`, installed or in a source checkout.

    Installed, they sit inside the package (pyproject's package-dir mapping); in a checkout
    (including editable installs) they are the top-level folders.
    """
    here = Path(__file__).resolve().parent
    installed = here / name
    return installed if installed.is_dir() else here.parent / _FOLDERS[name]


def family_spec(model_type: str) -> dict[str, Any] | None:
    """What mlxlocal knows about a model family beyond mlx-lm (None for an unlisted family)."""
    path = builtin_dir("families") / f"{model_type}.yaml"
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MlxLocalError(f"{path}: broken family spec ({e}); reinstall mlxlocal") from e


def family_specs() -> dict[str, dict[str, Any]]:
    return {p.stem: family_spec(p.stem) for p in sorted(builtin_dir("families").glob("*.yaml"))}
