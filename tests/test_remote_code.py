"""Code shipped with a checkpoint never runs: not on a "y" typed into a terminal, not carried on."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import time

import pytest

from mlxlocal import MlxLocalError
from mlxlocal.checkpoint.files import copy_tokenizer_files
from mlxlocal.models import hf_tokenizer

# Imported by transformers only if it runs the checkpoint's code: it leaves a mark.
EVIL = """
import os, pathlib
pathlib.Path(os.environ["MLXLOCAL_TEST_MARK"]).write_text("ran")
from transformers import PreTrainedTokenizerFast as EvilTokenizer
"""


def with_custom_tokenizer(src, dst):
    """A copy of `src` whose tokenizer is custom code (auto_map), as some Hub repos ship."""
    shutil.copytree(src, dst)
    (dst / "tokenization_evil.py").write_text(EVIL)
    settings = json.loads((dst / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "EvilTokenizer"
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(settings))
    return dst


def run_in_terminal(args: list[str], env: dict, answer: bytes, timeout: float = 240) -> tuple:
    """Run a command on a pseudo-terminal, typing `answer` whenever it waits; (rc, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out, deadline = b"", time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            os.write(leader, answer)
            import select

            if select.select([leader], [], [], 0.5)[0]:
                out += os.read(leader, 4096)
        except OSError:
            break
    try:
        while chunk := os.read(leader, 4096):
            out += chunk
    except OSError:
        pass
    os.close(leader)
    proc.wait(timeout=10)
    return proc.returncode, out.decode(errors="replace")


def test_custom_tokenizer_code_is_refused_even_after_yes(tiny_mlx, tmp_path):
    model = with_custom_tokenizer(tiny_mlx, tmp_path / "model")
    mark = tmp_path / "mark"
    env = {**os.environ, "MLXLOCAL_TEST_MARK": str(mark)}
    cmd = [sys.executable, "-m", "mlxlocal.cli", "generate", str(model), "-p", "hi"]
    rc, out = run_in_terminal(cmd + ["--max-tokens", "2"], env, b"y\n")
    assert not mark.exists(), out
    assert rc == 1 and "Traceback" not in out, out
    assert "error: " in out and "never runs" in out, out


def test_export_tokenizer_refuses_custom_code(tiny_mlx, tmp_path, monkeypatch):
    model = with_custom_tokenizer(tiny_mlx, tmp_path / "model")
    monkeypatch.setenv("MLXLOCAL_TEST_MARK", str(tmp_path / "mark"))
    with pytest.raises(MlxLocalError, match="never runs"):
        hf_tokenizer(model)
    assert not (tmp_path / "mark").exists()


def test_converted_checkpoints_do_not_carry_auto_map(checkpoints, tmp_path):
    from mlxlocal import convert

    src = shutil.copytree(checkpoints("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(config))
    with_custom_tokenizer(src, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "out")
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    settings = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "auto_map" not in settings and settings["tokenizer_class"] == "EvilTokenizer"
    assert "auto_map" in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    copy_tokenizer_files(tmp_path / "hf", tmp_path / "out")  # and again over existing files
    assert "auto_map" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
