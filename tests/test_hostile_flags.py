"""Hostile flags and text: out-of-range numbers, bytes that are not UTF-8, chat templates that
fail at run time, unknown tokenizer parsers — one `error:` line each (in chat: one note, and the
chat goes on)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import write_recipe
from test_bad_input import assert_clean_failure

from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.generate import Sampling


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


# --- numeric flags ------------------------------------------------------------------------------

BAD_FLAGS = [
    ("--seed", -1, "0<=x<=18446744073709551615"),
    ("--seed", 2**64, "0<=x<=18446744073709551615"),
    ("--temp", "nan", "not a finite number"),
    ("--temp", "inf", "not a finite number"),
    ("--repetition-penalty", "inf", "not a finite number"),
    ("--top-p", "nan", "not a finite number"),
    ("--max-tokens", 0, "x>=1"),
    ("--top-k", -1, "x>=0"),
]


@pytest.mark.parametrize(("flag", "value", "needle"), BAD_FLAGS)
def test_generate_flag_out_of_range(flag, value, needle, tiny_mlx):
    result = run("generate", tiny_mlx, "-p", "Hi", "--max-tokens", 2, flag, value)
    assert_clean_failure(result, flag, needle)


def test_batch_flags_out_of_range(tiny_mlx, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "hi"}\n')
    io = ["--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl"]
    for flag, value in (("--seed", 2**64), ("--batch-size", 10**30), ("--batch-size", 0)):
        assert_clean_failure(
            run("batch", tiny_mlx, *io, flag, value), flag, out=tmp_path / "out.jsonl"
        )


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--group-size", 0, "16<=x<=128"),
        ("--bits", 0, "2<=x<=8"),
        ("--target-bpw", "nan", "finite"),
    ],
)
def test_quantize_flag_out_of_range(flag, value, needle, tiny_mlx, tmp_path):
    result = run("quantize", tiny_mlx, tmp_path / "q", flag, value, "--no-eval")
    assert_clean_failure(result, flag, needle, out=tmp_path / "q")


@pytest.mark.parametrize(
    "bad", [dict(seed=-1), dict(seed=2**64), dict(repetition_penalty=float("inf")), dict(top_k=2.5)]
)
def test_library_sampling_refuses_what_mlx_cannot_take(bad):
    with pytest.raises(MlxLocalError):
        Sampling(**bad)


def test_top_k_at_or_above_the_vocabulary_keeps_every_token(tiny_mlx, tmp_path):
    common = ["generate", tiny_mlx, "-p", "Hi", "--temp", 1, "--seed", 3, "--max-tokens", 8]
    off = run(*common, "--ignore-eos", "--json")
    assert off.exit_code == 0, off.output
    for top_k in (512, 10**30):  # 512: the vocabulary size, which mlx-lm refuses too
        result = run(*common, "--ignore-eos", "--json", "--top-k", top_k)
        assert result.exit_code == 0, result.output
        assert "every token is kept" in result.stderr
        assert json.loads(result.stdout)["text"] == json.loads(off.stdout)["text"]
    (tmp_path / "in.jsonl").write_text('{"text": "hi"}\n')
    io = ["--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl"]
    result = run("batch", tiny_mlx, *io, "--temp", 1, "--top-k", 10**6, "--max-tokens", 2)
    assert result.exit_code == 0, result.output


# --- text that is not UTF-8 ---------------------------------------------------------------------


def test_prompt_on_stdin_that_is_not_utf8(tiny_mlx):
    result = run("generate", tiny_mlx, "-p", "-", input=b"Hi \xff\xfe there")
    assert_clean_failure(result, "stdin is not UTF-8", "0xff", "offset 3")


@pytest.mark.parametrize("flag", ["--prompt", "--system", "--stop"])
def test_command_line_text_that_is_not_utf8(flag, tiny_mlx):
    # Python hands undecodable command-line bytes over as lone surrogates (surrogateescape).
    args = ["-p", "Hi"] if flag != "--prompt" else []
    result = run("generate", tiny_mlx, *args, flag, "caf\udce9", "--max-tokens", 2)
    assert_clean_failure(result, flag, "not UTF-8")


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(tiny_mlx):
    clean = run("chat", tiny_mlx, "--max-tokens", 6, input=b"Hi\n/quit\n")
    assert clean.exit_code == 0, clean.output
    result = run("chat", tiny_mlx, "--max-tokens", 6, input=b"\xc3\x28 oops\nHi\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not UTF-8" in errors[0], result.stderr
    assert result.stdout == clean.stdout  # the next line was answered as if alone


# --- chat templates that fail at run time -------------------------------------------------------

# Each fails only on a message containing "boom", so one record of many can be skipped.
HOSTILE = {
    "ZeroDivisionError": "{{ 1 // 0 }}",
    "RecursionError": "{{ f() }}",
    "OverflowError": "{% for i in range(10**12) %}{% endfor %}",
}


@pytest.fixture(params=list(HOSTILE))
def hostile(request, tiny_mlx, tmp_path):
    """(the exception's name, a copy of tiny_mlx whose template raises it on "boom")."""
    model = shutil.copytree(tiny_mlx, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    trap = (
        "{% macro f() %}{{ f() }}{% endmacro %}{% for m in messages %}"
        f"{{% if 'boom' in m['content'] %}}{HOSTILE[request.param]}{{% endif %}}{{% endfor %}}"
    )
    config["chat_template"] = trap + config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return request.param, model


def test_template_failure_in_generate(hostile):
    name, model = hostile
    assert_clean_failure(run("generate", model, "-p", "boom"), "chat template", name)


def test_template_failure_in_chat_is_a_note(hostile):
    name, model = hostile
    result = run("chat", model, "--max-tokens", 4, input="boom\nHi\n/quit\n")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], result.stderr
    assert result.stdout.strip()  # "Hi" was answered


def test_template_failure_in_batch(hostile, tmp_path):
    name, model = hostile
    lines = [{"text": "hello"}, {"text": "boom"}, {"text": "bye"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    io = ["--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--max-tokens", 2]
    assert_clean_failure(run("batch", model, *io), "in.jsonl:2", name, out=tmp_path / "out.jsonl")
    result = run("batch", model, *io, "--on-error", "skip", "--force")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [("error" in r) for r in out] == [False, True, False]
    assert name in out[1]["error"]


def _chat_data(path, n=4):
    rows = [
        {"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": a}]}
        for c, a in zip(["hello"] * (n - 1) + ["boom"], ["yes", "no"] * n, strict=False)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("task", ["perplexity", "classify", "generate"])
def test_template_failure_in_eval(task, hostile, tmp_path):
    name, model = hostile
    data = _chat_data(tmp_path / "data.jsonl")
    args = ["--data", data, "--task", task, "--max-tokens", 2]
    assert_clean_failure(run("eval", model, *args), "chat template", name)


def test_template_failure_in_training_data(hostile, tmp_path):
    name, model = hostile
    data = _chat_data(tmp_path / "train.jsonl", n=9)
    recipe = write_recipe(tmp_path, model, data__train=str(data), training__steps=1)
    assert_clean_failure(run("run", recipe), "train.jsonl:9", name)
    result = run("run", recipe, "data.bad_lines=skip", f"output={tmp_path / 'skip'}")
    assert result.exit_code == 0, result.output
    assert "1 bad" in result.output


# --- tokenizer configs mlx-lm cannot load -------------------------------------------------------


@pytest.mark.parametrize("value", ["bogus", "__init__", ""])
def test_unknown_tool_parser_type(value, tiny_mlx, tmp_path):
    model = shutil.copytree(tiny_mlx, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["tool_parser_type"] = value
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = run("generate", model, "-p", "Hi", "--max-tokens", 2)
    assert_clean_failure(result, "tool_parser_type", "json_tools", "remove the key")


@pytest.mark.parametrize("key", ["tool_parser_type", "chat_template_type"])
def test_unknown_tokenizer_module_is_refused_before_writing(key, tiny_mlx, tmp_path):
    """convert and quantize copy tokenizer_config.json unread: an output every verb would then
    refuse is not written. GGUF export carries no such key: it writes the file and says so."""
    model = shutil.copytree(tiny_mlx, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config[key] = "bogus"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for verb in (["convert"], ["quantize", "--no-eval"]):
        result = run(verb[0], model, tmp_path / "out", *verb[1:])
        assert_clean_failure(result, key, "names nothing mlx-lm has", "remove the key")
        assert not (tmp_path / "out").exists()
    result = run("export", "gguf", model, tmp_path / "m.gguf")
    assert result.exit_code == 0, result.output
    assert f'{key} is "bogus"' in result.output and (tmp_path / "m.gguf").is_file()
