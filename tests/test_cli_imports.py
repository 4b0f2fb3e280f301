"""`import mlxlocal` and `mlxlocal --help` load no model code: verbs are imported on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Model code (mlx-lm's architectures, MLX's layers, the transformers/torch peers) and the
# libraries only a running verb needs: none of it loads before a verb runs. Measured: `--help`
# loads click, yaml and mlx.core only (0.17 s; it was ~1 s with every verb imported).
HEAVY = {
    "numpy",
    "mlx_lm",
    "mlx.nn",
    "transformers",
    "torch",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "huggingface_hub",
    "jinja2",
    "gguf",
    "pydantic",
    "sacrebleu",
    "matplotlib",
}
# The verbs that run models: the CLI imports each only inside its command.
VERBS = {
    f"mlxlocal.{name}"
    for name in (
        "batch chat convert evaluate export generate gguf_import info plan quality quantize "
        "quickstart recipe report serve train verify"
    ).split()
}

HELP = """
import json, sys
from mlxlocal.cli import main
sys.argv = ["mlxlocal", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(sys.modules)))
"""


def loaded_modules(*args: str) -> list[str]:
    """Every module a fresh interpreter has imported after `mlxlocal ARGS`."""
    done = subprocess.run(
        [sys.executable, "-c", HELP, *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def too_early(module: str) -> bool:
    """Whether `module` is, or is inside, a package `--help` must not load."""
    parts = module.split(".")
    return any(".".join(parts[:n]) in HEAVY | VERBS for n in range(1, len(parts) + 1))


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["convert", "--help"],
        ["quantize", "--help"],
        ["generate", "--help"],
        ["batch", "--help"],
        ["eval", "--help"],
        ["run", "--help"],
        ["export", "gguf", "--help"],
        ["recipes", "--help"],
        ["plan", "--help"],
    ],
)
def test_help_imports_no_model_code(args):
    modules = loaded_modules(*args)
    assert "mlxlocal.cli" in modules
    assert not [m for m in modules if too_early(m)]


def test_import_mlxlocal_imports_no_verb():
    code = "import json, sys, mlxlocal; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = [m for m in json.loads(done.stdout) if m.startswith("mlxlocal")]
    assert modules == ["mlxlocal", "mlxlocal.errors"]


def test_verbs_named_like_their_module_stay_the_functions():
    """Importing the submodule `mlxlocal.batch` (before or after the attribute is read) does
    not turn the function `mlxlocal.batch` into that module."""
    code = """
import inspect
import mlxlocal
assert inspect.isfunction(mlxlocal.convert)  # read before its submodule is imported
import mlxlocal.batch  # imported before the attribute is read
from mlxlocal.generate import Sampling
for name in ("batch", "convert", "generate", "info", "load_model", "quantize", "stream"):
    assert inspect.isfunction(getattr(mlxlocal, name)), name
assert mlxlocal.Sampling is Sampling
assert set(mlxlocal.__all__) <= set(dir(mlxlocal))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
