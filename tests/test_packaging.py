"""The installed package is what users run: its wheel must hold the shipped data (datasets, the
chat page, recipes) and build without setuptools warnings (issue 14: a quiet install)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_quietly_with_its_data(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("mlxlocal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "mlxlocal/datasets/sentiment-train.jsonl",
        "mlxlocal/serve/static/index.html",
        "mlxlocal/serve/static/app.js",
        "mlxlocal/recipes/tiny-lora.yaml",
        "mlxlocal/model_configs/Qwen--Qwen2.5-7B-Instruct.json",  # `plan` offline
    ):
        assert shipped in names
