"""Opt-in fast BLAS for MLX's Linux CPU back end.

MLX's Linux CPU wheel links the reference BLAS: its fp32 matmul runs at ~5 GFLOP/s where an
optimised BLAS on the same cores reaches ~300. MLX calls only the standard CBLAS entry points
(cblas_sgemm/dgemm/cgemm), so Intel's MKL (`libmkl_rt`, from PyPI's `mkl`) preloaded with
LD_PRELOAD takes those calls without any change to MLX. A preload must be in place before the
process starts, so the CLI re-executes itself once with it when MLXLOCAL_BLAS=mkl.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

from .errors import MlxLocalError

ENV = "MLXLOCAL_BLAS"


def mkl_library() -> Path | None:
    """libmkl_rt from the installed `mkl` wheel, if any."""
    try:
        candidates = [f for f in files("mkl") or [] if Path(str(f)).name.startswith("libmkl_rt.so")]
    except PackageNotFoundError:
        return None
    paths = [Path(str(f.locate())).resolve() for f in candidates]
    return next((p for p in paths if p.exists()), None)


def fast_blas_env(environ: dict[str, str], verb: str | None = None) -> dict[str, str] | None:
    """Environment additions that switch MLX to MKL, or None when nothing is to change.

    MKL's threads help training's large matrix products; `serve` gets one thread, since its
    HTTP threads need the other core (measured on two cores: 129 vs 83 tok/s at 16 clients,
    and the time to a first token halved)."""
    choice = environ.get(ENV, "bundled").strip().lower()
    if choice in ("", "bundled"):
        return None
    if choice != "mkl":
        raise MlxLocalError(f"{ENV}={choice!r}: use 'mkl' (fast, opt-in) or 'bundled' (default)")
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise MlxLocalError(f"{ENV}=mkl is for MLX's Linux x86_64 CPU back end; unset it here")
    lib = mkl_library()
    if lib is None:
        raise MlxLocalError(f"{ENV}=mkl needs Intel's MKL: pip install 'mlxlocal[fast-cpu]'")
    preload = environ.get("LD_PRELOAD", "")
    if str(lib) in preload.split(":"):
        return None
    # GNU OpenMP is what PyTorch (imported by transformers) already loads; one runtime is safer.
    layer = "GNU" if ctypes.util.find_library("gomp") and verb != "serve" else "SEQUENTIAL"
    return {
        "LD_PRELOAD": ":".join(p for p in (str(lib), preload) if p),
        "MKL_THREADING_LAYER": environ.get("MKL_THREADING_LAYER", layer),
    }


def reexec_with_fast_blas() -> None:
    """Restart this CLI process with MKL preloaded when the user asked for it."""
    verb = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    env = fast_blas_env(dict(os.environ), verb)
    if env:
        args = [sys.executable, "-m", "mlxlocal.cli", *sys.argv[1:]]
        os.execve(sys.executable, args, {**os.environ, **env})


def active_blas() -> str:
    """'mkl' when libmkl_rt is mapped into this process, else 'bundled'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "bundled"
    return "mkl" if "libmkl_rt" in maps else "bundled"


def check_matmul(n: int = 1024, reps: int = 3) -> dict[str, float | str]:
    """fp32 matmul through MLX: relative error against float64 numpy, and GFLOP/s."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    ma, mb = mx.array(a), mx.array(b)
    mx.eval(ma @ mb)
    start = time.perf_counter()
    for _ in range(reps):
        c = ma @ mb
        mx.eval(c)
    seconds = (time.perf_counter() - start) / reps
    ref = a.astype(np.float64) @ b.astype(np.float64)
    return {
        "blas": active_blas(),
        "relative_error": float(np.abs(np.array(c) - ref).max() / np.abs(ref).max()),
        "gflops": 2 * n**3 / seconds / 1e9,
    }
