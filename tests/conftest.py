"""Shared fixtures: no network, a private temp dir, tiny real Hugging Face checkpoints."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")  # for speed; `compiled` turns it back on
os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="mlxlocal-tests-")
os.environ["MLXLOCAL_CACHE"] = os.path.join(os.environ["TMPDIR"], "cache")  # builtin:tiny etc.
tempfile.tempdir = None

from helpers import make_hf_checkpoint  # noqa: E402

pytest_plugins = ["browser"]  # the `browser` fixture: headless chromium (tests/browser.py)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to connect anywhere fails the test that made it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def compiled():
    """`mx.compile` on for one test, as users run (the suite runs with it off for speed)."""
    import mlx.core as mx

    mx.enable_compile()
    yield
    if "MLX_DISABLE_COMPILE" in os.environ:
        mx.disable_compile()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch → a tiny HF checkpoint written by transformers, built once per session."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}

    def get(arch: str, **kw) -> Path:
        key = arch + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
        if key not in cache:
            cache[key] = make_hf_checkpoint(arch, root / key.replace("/", "_"), **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_mlx(checkpoints, tmp_path_factory):
    """The tiny Llama checkpoint converted to MLX (fp32), once per session."""
    from mlxlocal import convert

    out = tmp_path_factory.mktemp("mlx") / "llama"
    convert(checkpoints("llama"), out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tiny_mlx):
    """`tiny_mlx` loaded for generation (shared: tests must leave it as they found it)."""
    from mlxlocal.generate import load_model

    return load_model(tiny_mlx)


@pytest.fixture(scope="session")
def mlx_checkpoints(checkpoints, tmp_path_factory):
    """arch (+ config overrides) → the tiny checkpoint converted to MLX (fp32), once each."""
    from mlxlocal import convert

    root = tmp_path_factory.mktemp("mlx-arch")
    cache: dict[str, Path] = {}

    def get(arch: str, **kw) -> Path:
        src = checkpoints(arch, **kw)
        if src not in cache:
            cache[src] = convert(src, root / src.name, dtype="float32").out
        return cache[src]

    return get
