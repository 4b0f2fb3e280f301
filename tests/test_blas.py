"""The opt-in MKL path for MLX's Linux CPU back end: chosen only when asked, and correct."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from helpers import mlx_logits, probe_ids

import mlxlocal.blas as blas
from mlxlocal import MlxLocalError, convert

# By platform only, never by whether `mkl` is installed: on Linux x86_64 these must run.
mkl_platform = pytest.mark.skipif(
    (platform.system(), platform.machine()) != ("Linux", "x86_64"),
    reason="MKL is for MLX's Linux x86_64 CPU back end",
)


def test_env_is_untouched_unless_asked():
    assert blas.fast_blas_env({}) is None
    assert blas.fast_blas_env({"MLXLOCAL_BLAS": "bundled"}) is None
    with pytest.raises(MlxLocalError, match="use 'mkl'"):
        blas.fast_blas_env({"MLXLOCAL_BLAS": "openblas"})


def test_mkl_elsewhere_says_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(blas.platform, "system", lambda: "Darwin")
    with pytest.raises(MlxLocalError, match="Linux x86_64 CPU back end; unset it"):
        blas.fast_blas_env({"MLXLOCAL_BLAS": "mkl"})


@mkl_platform
def test_missing_mkl_says_how_to_install(monkeypatch):
    monkeypatch.setattr(blas, "mkl_library", lambda: None)
    with pytest.raises(MlxLocalError, match=r"mlxlocal\[fast-cpu\]"):
        blas.fast_blas_env({"MLXLOCAL_BLAS": "mkl"})


@mkl_platform
def test_preload_is_added_once():
    env = blas.fast_blas_env({"MLXLOCAL_BLAS": "mkl", "LD_PRELOAD": "/x/libother.so"})
    lib = str(blas.mkl_library())
    assert env["LD_PRELOAD"] == f"{lib}:/x/libother.so"
    assert env["MKL_THREADING_LAYER"] in ("GNU", "SEQUENTIAL")
    serve = blas.fast_blas_env({"MLXLOCAL_BLAS": "mkl"}, "serve")
    assert serve["MKL_THREADING_LAYER"] == "SEQUENTIAL"
    mine = {"MLXLOCAL_BLAS": "mkl", "MKL_THREADING_LAYER": "INTEL"}
    assert blas.fast_blas_env(mine, "serve")["MKL_THREADING_LAYER"] == "INTEL"
    assert blas.fast_blas_env({"MLXLOCAL_BLAS": "mkl", "LD_PRELOAD": lib}) is None


def _cli(*args, **env):
    cmd = [sys.executable, "-m", "mlxlocal.cli", *args]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@mkl_platform
def test_mkl_matmul_is_used_and_correct():
    bundled = json.loads(_cli("blas", "--json"))
    fast = json.loads(_cli("blas", "--json", MLXLOCAL_BLAS="mkl"))
    assert bundled["blas"] == "bundled" and fast["blas"] == "mkl"
    assert fast["relative_error"] <= 1e-5 and bundled["relative_error"] <= 1e-5


@mkl_platform
def test_model_logits_agree_under_mkl(checkpoints, tmp_path):
    out = convert(checkpoints("llama"), tmp_path / "m").out
    ids = probe_ids()
    code = (
        "import sys, json, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "from helpers import mlx_logits; from mlxlocal.blas import active_blas;"
        "print(active_blas());"
        "np.save(sys.argv[3], mlx_logits(sys.argv[2], json.loads(sys.argv[4])))"
    )
    here = os.path.dirname(__file__)
    env = {**os.environ, **blas.fast_blas_env({"MLXLOCAL_BLAS": "mkl"})}
    args = [here, str(out), str(tmp_path / "mkl.npy"), json.dumps(ids)]
    run = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "mkl", run.stderr
    np.testing.assert_allclose(np.load(tmp_path / "mkl.npy"), mlx_logits(out, ids), atol=1e-4)
