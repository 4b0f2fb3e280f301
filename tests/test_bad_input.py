"""Everything a user can get wrong: one clear line, exit 1, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from click.testing import CliRunner

from mlxlocal.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def assert_clean_failure(result, *needles, out=None):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_src(tmp_path):
    assert_clean_failure(
        run("convert", tmp_path / "nope", tmp_path / "out"),
        "no such folder",
        out=tmp_path / "out",
    )


def test_no_config(tmp_path):
    (tmp_path / "src").mkdir()
    assert_clean_failure(
        run("convert", tmp_path / "src", tmp_path / "out"), "no config.json", out=tmp_path / "out"
    )


def test_unknown_model_type(checkpoints, tmp_path):
    src = _copy(checkpoints("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (src / "config.json").write_text(json.dumps(config))
    result = run("convert", src, tmp_path / "out")
    assert_clean_failure(
        result, "frobnicator", "not supported", "llama", "qwen2", out=tmp_path / "out"
    )


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if how == "header_too_long":
        data[:8] = struct.pack("<Q", len(data) + 10)
    elif how == "bad_json":
        data[8:12] = b"{{{{"
    elif how == "offsets_out_of_range":
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 10**6
        raw = json.dumps(header).encode().ljust(n)
        data[8 : 8 + n] = raw[:n] if len(raw) <= n else raw
        data[:8] = struct.pack("<Q", len(raw))
    elif how == "truncated":
        data = data[: 8 + n + (len(data) - 8 - n) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["header_too_long", "bad_json", "offsets_out_of_range", "truncated"]
)
def test_corrupt_safetensors(how, checkpoints, tmp_path):
    src = _copy(checkpoints("llama"), tmp_path / "src")
    _corrupt(src / "model.safetensors", how)
    result = run("convert", src, tmp_path / "out")
    assert_clean_failure(
        result, "model.safetensors", "not a valid safetensors file", out=tmp_path / "out"
    )


def test_malicious_bin_runs_nothing(checkpoints, tmp_path):
    import torch

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(checkpoints("llama") / "config.json", src)
    torch.save({"model.embed_tokens.weight": Evil()}, src / "pytorch_model.bin")
    result = run("convert", src, tmp_path / "out")
    assert_clean_failure(result, "pytorch_model.bin", "system", out=tmp_path / "out")
    assert not sentinel.exists()


def test_out_exists_is_refused_and_force_replaces(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("convert", checkpoints("llama"), out)
    assert (
        result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    )
    assert (out / "keep.txt").read_text() == "mine"
    result = run("convert", checkpoints("llama"), out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_disk_failure_midway_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """The disk fills up while the second shard is being written."""
    import errno

    import mlxlocal.checkpoint.shards as shards

    opened = []

    class FillsUp:
        def __init__(self, path):
            self.f, self.written = open(path, "wb"), 0
            opened.append(path)

        def write(self, data):
            self.written += len(memoryview(data).cast("B"))
            if len(opened) == 2 and self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def close(self):
            self.f.close()

    monkeypatch.setattr(shards, "open_output", FillsUp)
    out = tmp_path / "out"
    result = run("convert", checkpoints("llama"), out, "--shard-size", "100KB")
    assert_clean_failure(result, "No space left on device", out=out)
    assert len(opened) == 2


def test_force_failure_keeps_the_old_out(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    result = run("convert", tmp_path / "empty", out, "--force")
    assert result.exit_code == 1
    assert (out / "keep.txt").read_text() == "mine"


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(
        cli, ["--debug", "convert", str(tmp_path / "x"), str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "Traceback" in result.output


def test_bad_dtype_is_a_usage_error(checkpoints, tmp_path):
    result = run("convert", checkpoints("llama"), tmp_path / "out", "--dtype", "int8")
    assert_clean_failure(result, "--dtype", "float16")
