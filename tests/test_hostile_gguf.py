"""Hostile GGUF files given to `mlxlocal convert`: each is one `error:` line, exit 1, no
traceback and nothing written. Every file starts as a valid export of the tiny model and is
corrupted in one place, with the gguf package's own writer where the format allows it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from mlxlocal.cli import cli
from mlxlocal.export.gguf import export_gguf

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
TOK = "tokenizer.ggml."


@pytest.fixture(scope="module")
def good(tiny_mlx, tmp_path_factory) -> Path:
    return export_gguf(tiny_mlx, tmp_path_factory.mktemp("gguf") / "m.gguf", type="f32").out


def _rewrite(src: Path, out: Path, fields: dict | None = None, tensor=None) -> Path:
    """Copy the GGUF `src` with `fields` (key → (value, type, item type)) set, and the tensor
    blk.0.attn_q.weight written by `tensor(writer, name, data)` when given."""
    fields = fields or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in fields:
            continue
        sub = field.types[-1] if field.types[0] == V.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub)
    for name, (value, kind, sub) in fields.items():
        writer.add_key_value(name, value, kind, sub)
    for t in reader.tensors:
        if t.name == "blk.0.attn_q.weight" and tensor is not None:
            tensor(writer, t.name, np.asarray(t.data))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _half_width(writer, name, data):
    writer.add_tensor(name, data[:, : data.shape[1] // 2].copy())


def _too_few_bytes(writer, name, data):
    """The header keeps the shape, but only half the bytes are stored."""
    writer.add_tensor(name, data.ravel()[: data.size // 2].copy(), data.shape, Q.F32)


def _unknown_type(writer, name, data):
    writer.add_tensor(name, data, raw_dtype=99)


CASES = {
    "rope linear without factor": (
        {"llama.rope.scaling.type": ("linear", V.STRING, None)},
        None,
        "lacks llama.rope.scaling.factor",
    ),
    "rope factor a string": (
        {
            "llama.rope.scaling.type": ("linear", V.STRING, None),
            "llama.rope.scaling.factor": ("two", V.STRING, None),
        },
        None,
        "rope.scaling.factor is 'two', not a positive number",
    ),
    "rope scaling unknown": (
        {"llama.rope.scaling.type": ("yarn", V.STRING, None)},
        None,
        "rope scaling 'yarn' is not supported",
    ),
    "short token_type": (
        {TOK + "token_type": ([1, 1, 1], V.ARRAY, V.INT32)},
        None,
        "token_type has 3 entries for",
    ),
    "merge without a space": (
        {TOK + "merges": (["ab"], V.ARRAY, V.STRING)},
        None,
        "merge 'ab' is not two tokens",
    ),
    "merges a number": ({TOK + "merges": (5, V.UINT32, None)}, None, "not a list of strings"),
    "tokens a string": ({TOK + "tokens": ("abc", V.STRING, None)}, None, "not a list of strings"),
    "tokens integers": (
        {TOK + "tokens": ([1, 2], V.ARRAY, V.INT32)},
        None,
        "tokens is '[1, 2]', not a list of strings",
    ),
    "model a number": ({TOK + "model": (3, V.UINT32, None)}, None, "model is '3', not a string"),
    "pre a number": ({TOK + "pre": (3, V.UINT32, None)}, None, "pre is '3', not a string"),
    "add_bos a string": (
        {TOK + "add_bos_token": ("yes", V.STRING, None)},
        None,
        "not true or false",
    ),
    "bos id a string": ({TOK + "bos_token_id": ("1", V.STRING, None)}, None, "not an integer"),
    "chat template a number": (
        {"tokenizer.chat_template": (3, V.UINT32, None)},
        None,
        "chat_template is '3', not a string",
    ),
    "general.type a number": (
        {"general.type": (3, V.UINT32, None)},
        None,
        "general.type is '3', not a string",
    ),
    "rms eps a string": (
        {"llama.attention.layer_norm_rms_epsilon": ("x", V.STRING, None)},
        None,
        "layer_norm_rms_epsilon is 'x', not a positive number",
    ),
    "rope theta a string": (
        {"llama.rope.freq_base": ("fast", V.STRING, None)},
        None,
        "freq_base is 'fast', not a positive number",
    ),
    "context length a string": (
        {"llama.context_length": ("long", V.STRING, None)},
        None,
        "context_length is 'long', not a positive integer",
    ),
    "head count an array": (
        {"llama.attention.head_count": ([4, 4], V.ARRAY, V.UINT32)},
        None,
        "head_count is '[4, 4]', not a positive integer",
    ),
    "head count 0": (
        {"llama.attention.head_count": (0, V.UINT32, None)},
        None,
        "head_count is '0'",
    ),
    "odd head width": (
        {"llama.attention.key_length": (15, V.UINT32, None)},
        None,
        "heads are 15 wide",
    ),
    "more heads than width": (
        {"llama.attention.head_count": (128, V.UINT32, None)},
        None,
        "heads are 0 wide",
    ),
    "tensor of the wrong shape": ({}, _half_width, "attn_q.weight has shape [64, 32]"),
    "bytes that do not match the shape": ({}, _too_few_bytes, "needs 16384 bytes but 8192"),
    "unknown tensor type": ({}, _unknown_type, "not a valid GGMLQuantizationType"),
}


def _refused(path: Path, out: Path, says: str) -> None:
    result = CliRunner().invoke(cli, ["convert", str(path), str(out)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.output
    assert sorted(p.name for p in out.parent.iterdir()) == [path.name], "something was written"


@pytest.mark.parametrize("case", CASES)
def test_hostile_gguf_is_one_line(case, good, tmp_path):
    fields, tensor, says = CASES[case]
    path = _rewrite(good, tmp_path / "bad.gguf", fields, tensor)
    _refused(path, tmp_path / "out", says)


def test_untouched_rewrite_converts(good, tmp_path):
    """The corruption, not the rewriting, is what the cases above refuse."""
    path = _rewrite(good, tmp_path / "same.gguf")
    result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.3, 0.999])
def test_truncated_gguf_is_one_line(fraction, good, tmp_path):
    path = tmp_path / "cut.gguf"
    data = good.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]
