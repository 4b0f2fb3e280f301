"""mlxlocal: convert, quantize, talk to and fine-tune language models locally with MLX.

The verbs are imported on first use (PEP 562), so `import mlxlocal` and `mlxlocal --help` stay
fast and load no model code.
"""

from __future__ import annotations

import importlib
import sys
import types

from .errors import MlxLocalError

__version__ = "0.1.0"

# Public name → the module that defines it.
_LAZY = {
    "Sampling": "generate",
    "batch": "batch",
    "convert": "convert",
    "generate": "generate",
    "info": "info",
    "load_model": "generate",
    "quantize": "quantize",
    "stream": "generate",
}

__all__ = ["MlxLocalError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`mlxlocal.convert` (batch, generate, info, quantize) stays the function: importing the
    submodule of that name would otherwise rebind the package attribute to the module."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
