"""Holes the hostile corpus found or issue 13 listed last: lone surrogates from Python callers and
JSON escapes, strings in GGUF files that are not UTF-8, a GGUF array claiming 2^60 entries,
template failures in the Ollama export and in batch's --template, and headers naming thousands
of tiny layers — each one MlxLocalError line, before any large allocation."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from click.testing import CliRunner
from test_bad_input import assert_clean_failure, run
from test_hostile_gguf import TOK, V, _rewrite, good  # noqa: F401 (good: a fixture)

from mlxlocal.cli import cli
from mlxlocal.data import Sample, tokenize_sample
from mlxlocal.errors import MlxLocalError
from mlxlocal.generate import generate
from mlxlocal.gguf_import import convert_gguf
from mlxlocal.models import MIN_LAYER_WEIGHTS, check_config_sizes


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (
            dict(prompt="caf\udce9"),
            "the prompt is not valid text: it holds the lone surrogate U.DCE9 at offset 3",
        ),
        (dict(prompt="caf\udce9", chat_template=False), "the prompt is not valid text"),
        (dict(prompt="hi", system="\ud800"), "the system prompt is not valid text"),
        (dict(prompt="hi", stop=["\ud800"]), "the stop string"),
    ],
)
def test_generate_refuses_lone_surrogates_from_python(options, says, tiny_lm):
    with pytest.raises(MlxLocalError, match=says):
        generate(tiny_lm, max_tokens=2, **options)


def test_batch_skips_a_json_escaped_surrogate_and_keeps_it_escaped(tiny_mlx, tmp_path):
    lines = ['{"text": "hi"}', '{"text": "a\\ud800b"}', '{"text": "ok"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    io = ["--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--max-tokens", 2]
    assert_clean_failure(run("batch", tiny_mlx, *io), "in.jsonl:2", "lone surrogate U+D800")
    result = run("batch", tiny_mlx, *io, "--on-error", "skip", "--force")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [("error" in r) for r in out] == [False, True, False]
    assert out[1]["text"] == "a\ud800b"  # written as the JSON escape it came in as


def test_a_training_row_with_a_lone_surrogate_is_a_bad_row(tiny_lm):
    from mlxlocal.data import BadRow

    with pytest.raises(BadRow, match="lone surrogate"):
        tokenize_sample(Sample(text="a\ud800"), tiny_lm.tokenizer, False, False)


def test_batch_template_that_cannot_format_a_record_is_one_line(tiny_mlx, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": "x", "b": "y"}\n')
    io = ["--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--force"]
    result = run("batch", tiny_mlx, *io, "--template", "{a:d}")
    assert_clean_failure(result, "the template cannot format this record", "ValueError")
    # Refused before any record: a width taken from a field, or one allocated whole (this one
    # was a MemoryError traceback; 10**9 would take a GB per record).
    for template in ("{a:{b}}", "{a:>99999999999}", "{a:.5000}"):
        result = run("batch", tiny_mlx, *io, "--template", template)
        assert_clean_failure(result, "asks for a width or precision above 1000")


def test_gguf_strings_that_are_not_utf8_are_one_line(good, tmp_path):  # noqa: F811
    import gguf

    tokens = [t.encode() for t in gguf.GGUFReader(good).fields[TOK + "tokens"].contents()]
    tokens[5] = b"\xff\xfeab"
    for name, fields in {
        "token": {TOK + "tokens": (tokens, V.ARRAY, V.STRING)},
        "value": {"general.name": (b"caf\xe9", V.STRING, None)},
    }.items():
        path = _rewrite(good, tmp_path / f"{name}.gguf", fields)
        with pytest.raises(MlxLocalError, match="a string in its metadata is not UTF-8"):
            convert_gguf(path, tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["tokens", "token_type"])
def test_gguf_array_claiming_2_to_the_60_entries_is_one_line(key, good, tmp_path):  # noqa: F811
    data = bytearray(good.read_bytes())
    name = (TOK + key).encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    data[at + 8 : at + 16] = struct.pack("<Q", 1 << 60)  # the count after (ARRAY, item type)
    (tmp_path / "huge.gguf").write_bytes(data)
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "huge.gguf"), str(tmp_path / "o")])
    assert_clean_failure(result, "an array claims 1152921504606846976 entries", out=tmp_path / "o")


def test_ollama_export_with_a_template_that_fails_is_one_line(tiny_mlx, tmp_path):
    model = shutil.copytree(tiny_mlx, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 1 // 0 }}" + config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = run("export", "ollama", model, tmp_path / "out")
    assert_clean_failure(result, "chat template fails", "ZeroDivisionError", out=tmp_path / "out")


def test_a_header_of_many_tiny_layers_is_refused_before_building_them():
    layers = 20_000
    shapes = {f"model.layers.{i}.input_layernorm.weight": (1,) for i in range(layers)}
    shapes["model.embed_tokens.weight"] = (64, 64)
    config = {"num_hidden_layers": layers, "hidden_size": 64, "vocab_size": 64}
    with pytest.raises(MlxLocalError, match=f"fewer than {MIN_LAYER_WEIGHTS} per layer"):
        check_config_sizes(config, shapes)
    # The same count of layers holding real weights passes.
    check_config_sizes(config, {k: (64, 64) for k in shapes})


def test_export_gguf_bounds_the_config_by_the_weights(tiny_mlx, tmp_path):
    model = shutil.copytree(tiny_mlx, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
    result = run("export", "gguf", model, tmp_path / "m.gguf")
    assert_clean_failure(result, "num_hidden_layers is 10000000", out=tmp_path / "m.gguf")


def test_a_config_value_transformers_looks_up_by_name_is_one_line(tiny_mlx, tmp_path):
    """Found by `make fuzz`: one flipped bit made `"dtype": "Float32"`, an AttributeError."""
    model = shutil.copytree(tiny_mlx, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dtype": "Float32"}))
    result = run("generate", model, "-p", "hi", "--max-tokens", 2)
    assert_clean_failure(result, f"{model / 'config.json'}: dtype is 'Float32', which names no")


def test_a_tokenizer_file_that_fails_to_load_is_named(tiny_mlx, tmp_path):
    """transformers' own errors name neither file nor problem ("maximum recursion depth")."""
    model = shutil.copytree(tiny_mlx, tmp_path / "model")
    (model / "tokenizer.json").write_text("[" * 100_000)
    result = run("generate", model, "-p", "hi", "--max-tokens", 2)
    assert_clean_failure(result, f"{model / 'tokenizer.json'}: not valid JSON (nested too deeply")
