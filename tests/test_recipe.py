"""Recipes: schema errors with key, line and suggestion; overrides; built-ins; builtin:tiny."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.recipe import (
    builtin_recipes,
    copy_recipe,
    dump_recipe,
    load_recipe,
)
from mlxlocal.sources import REPO_ID, resolve_source
from mlxlocal.train.preflight import validate_recipe

RECIPE = """\
# purpose: a test
model:
  path: builtin:tiny
data:
  train: train.jsonl
  max_length: 64
method:
  type: lora
  rank: 4
training:
  learning_rate: 1e-3
  steps: 10
  batch_size: 2
output: runs/test
"""
BUILTINS = {
    "llama3.2-1b-lora",
    "llama3.2-1b-qlora",
    "llama3.2-3b-qlora",
    "qwen2.5-0.5b-lora",
    "qwen2.5-1.5b-lora",
    "qwen2.5-1.5b-qlora",
    "qwen2.5-7b-qlora",
    "mistral-7b-qlora",
    "gemma2-2b-qlora",
    "phi3.5-mini-qlora",
    "tiny-lora",
    # Task recipes (issue 6): `<family>-<size>-<method>-<task>`.
    "tiny-lora-sentiment",
    "qwen2.5-0.5b-lora-sentiment",
    "qwen2.5-0.5b-lora-classify",
    "qwen2.5-1.5b-lora-translate",
    "qwen2.5-1.5b-qlora-chatbot",
    # Preference tuning (issue 18).
    "tiny-lora-polite",
    "qwen2.5-0.5b-lora-preference",
    "qwen2.5-1.5b-qlora-preference",
}
TASKS = ("sentiment", "classify", "translate", "chatbot", "polite", "preference")


@pytest.fixture
def recipe(tmp_path):
    """Write a recipe (RECIPE edited by `replace`) and its data next to it; return its path."""

    def write(text: str = RECIPE, **replace: str):
        for old, new in replace.items():
            assert old.replace("_", " ") in text or old in text
            text = text.replace(old, new)
        (tmp_path / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
        path = tmp_path / "recipe.yaml"
        path.write_text(text)
        return path

    return write


def _error(path, overrides=()) -> str:
    with pytest.raises(MlxLocalError) as e:
        load_recipe(path, overrides)
    return str(e.value)


def test_a_recipe_loads_with_defaults_and_resolved_paths(recipe, tmp_path):
    r = load_recipe(recipe())
    assert r.training.learning_rate == 1e-3 and isinstance(r.training.learning_rate, float)
    assert r.data.train == str(tmp_path / "train.jsonl")
    assert (r.method.alpha, r.training.optimizer, r.data.packing) == (16.0, "adamw", True)
    assert load_recipe(recipe()) == r
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(r))
    assert load_recipe(again) == r


def test_unknown_key_names_file_line_and_the_key_meant(recipe):
    path = recipe(RECIPE.replace("learning_rate:", "learning_rat:"))
    assert _error(path) == (
        f"{path}:11: training.learning_rat: unknown key; did you mean learning_rate?"
    )
    assert _error(recipe(RECIPE.replace("method:", "methd:"))).endswith(
        ":7: methd: unknown key; did you mean method?"
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"batch_size: 2": "batch_size: two"}, r":13: training.batch_size: input should be"),
        ({"type: lora": "type: qlora"}, r":8: method.type: 'qlora' is not allowed; did you mean"),
        ({"rank: 4": "rank: 0"}, r":9: method.rank: input should be greater than 0"),
        ({"path: builtin:tiny": "dtype: auto"}, r":2: model.path: required but missing"),
        ({"  path: builtin:tiny\n": ""}, r":2: model: expected a section of keys, got nothing"),
        ({"output: runs/test\n": ""}, r"recipe.yaml: output: required but missing"),
        ({"rank: 4": "layers: [0, x]"}, r":9: method.layers: expected 'all', a count"),
        ({"max_length: 64": "fields: {promt: q}"}, r":6: data.fields.promt: 'promt' is not"),
        ({"method:\n  type: lora\n  rank: 4": "method: lora"}, r":7: method: expected a section"),
    ],
)
def test_wrong_values_name_key_and_line(recipe, edit, expected):
    text = RECIPE
    for old, new in edit.items():
        text = text.replace(old, new)
    assert re.search(expected, _error(recipe(text))), _error(recipe(text))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["training.epochs=2"], r":12: training.steps: set training.epochs or training.steps, not"),
        (["training.steps=null"], r":10: training: set training.epochs or training.steps"),
        (["data.valid=v.jsonl", "data.valid_fraction=0.1"], r"data.valid_fraction: set data.valid"),
        (["eval.every=5"], r"eval.every: needs validation data"),
        (["method.type=full"], r":9: method.rank: applies to lora and dora, not to method.type"),
        (["method.type=full", "method.rank=8"], r"command line: method.rank: applies to lora"),
        (["model.quantize={bits: 4}", "method.rank=8", "method.type=dora"], None),
        (["model.quantize.bits=3", "method={type: full}"], r"model.quantize: full fine-tuning"),
        (["training.warmup_steps=10"], r"training.warmup_steps: 10 warmup steps leave none of 10"),
        (["training.min_learning_rate=0.1", "training.schedule=cosine"], r"is above training"),
        (["training.min_learning_rate=1e-4"], r"only cosine and linear schedules decay to it"),
        (["training.optimizer_args={beta: [0.9, 0.99]}"], r"optimizer_args.beta: not an argument"),
        (["training.optimizer=sgd", "training.optimizer_args.momentum=0.9"], None),
        (["method.layers=[1, 1]"], r"method.layers: lists a layer twice"),
    ],
)
def test_impossible_combinations_get_one_clear_line(recipe, overrides, expected):
    if expected is None:
        load_recipe(recipe(), overrides)
        return
    message = _error(recipe(), overrides)
    assert "\n" not in message and re.search(expected, message), message


def test_overrides_win_are_yaml_typed_and_errors_point_at_the_command_line(recipe, tmp_path):
    r = load_recipe(
        recipe(),
        [
            "training.learning_rate=3e-4",
            "data.packing=false",
            "method.layers=[0, 1]",
            "model.quantize={bits: 3}",
            "data.fields.prompt=question",
            "output=elsewhere",
        ],
    )
    assert r.training.learning_rate == 3e-4 and r.data.packing is False
    assert r.method.layers == [0, 1] and r.model.quantize.bits == 3
    assert r.model.quantize.group_size == 64 and r.data.fields == {"prompt": "question"}
    assert r.output == "elsewhere"
    assert _error(recipe(), ["training.learnin_rate=1"]) == (
        "command line: training.learnin_rate: unknown key; did you mean learning_rate?"
    )
    assert "command line: modle: unknown key; did you mean model?" in _error(
        recipe(), ["modle.path=x"]
    )
    with pytest.raises(MlxLocalError, match="expected key.path=value"):
        load_recipe(recipe(), ["training.steps"])
    with pytest.raises(MlxLocalError, match="model.path is a value, not a section"):
        load_recipe(recipe(), ["model.path.x=1"])


def test_a_local_model_next_to_the_recipe_is_found_and_a_hub_id_kept(recipe, tmp_path):
    (tmp_path / "my-model").mkdir()
    r = load_recipe(recipe(RECIPE.replace("builtin:tiny", "my-model")))
    assert r.model.path == str(tmp_path / "my-model")
    r = load_recipe(recipe(RECIPE.replace("builtin:tiny", "Qwen/Qwen2.5-0.5B-Instruct")))
    assert r.model.path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_override_paths_resolve_against_the_current_directory(recipe, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(recipe(), ["data.valid=v.jsonl"])
    assert r.data.train == str(tmp_path / "train.jsonl")
    assert r.data.valid == str(elsewhere / "v.jsonl")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model:\n  path: [\n", r"recipe.yaml:3: not valid YAML"),
        ("model:\n  path: a\n  path: b\n", r"recipe.yaml:3: model.path: duplicate key"),
        ("- a list\n", r"recipe.yaml:1: a recipe is a mapping of sections"),
        ("", r"recipe.yaml: model: required but missing"),
    ],
)
def test_broken_files(recipe, text, expected):
    assert re.search(expected, _error(recipe(text)))


def test_every_builtin_recipe_validates():
    found = {r.name: r for r in builtin_recipes()}
    assert set(found) == BUILTINS
    for name, info in found.items():
        # The schema and every combination check, for all; the model itself only for the
        # tiny one (the others are Hub models, not downloaded in tests).
        r = load_recipe(info.path)
        job = name.removesuffix("-" + name.rsplit("-", 1)[1]) if name.endswith(TASKS) else name
        assert (r.eval.task is not None) == (job != name), name
        assert re.fullmatch(r"[a-z0-9.]+-[0-9.]+b|tiny|[a-z0-9.]+-mini", job.rsplit("-", 1)[0])
        assert info.purpose, name
        assert job.endswith("qlora") == (r.model.quantize is not None)
        assert r.model.path == "builtin:tiny" if job == "tiny-lora" else REPO_ID.match(r.model.path)
        assert load_recipe(name) == r
    report = validate_recipe("tiny-lora")
    assert any(line.startswith("model builtin:tiny: found (llama") for line in report)
    assert any("65 examples (chat)" in line for line in report)  # 72, 7 held out
    assert "data valid: builtin:tiny-chat.jsonl: 7 examples (chat)" in report


def test_validate_checks_model_layers_and_data(recipe, tmp_path):
    path = recipe()
    assert "data train:" in validate_recipe(path)[-1]
    with pytest.raises(MlxLocalError, match=r"method.layers: \[5\] does not fit the model's 2"):
        validate_recipe(path, ["method.layers=[5]"])
    with pytest.raises(MlxLocalError, match="no such data file"):
        validate_recipe(path, ["data.train=missing.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(MlxLocalError, match=r"bad.jsonl:2: no 'text' field"):
        validate_recipe(path, [f"data.train={tmp_path / 'bad.jsonl'}"])
    skipping = validate_recipe(
        path, [f"data.train={tmp_path / 'bad.jsonl'}", "data.bad_lines=skip"]
    )
    assert skipping[-1].endswith("bad.jsonl: 1 examples (text), 1 bad lines skipped")
    with pytest.raises(MlxLocalError, match="not in the Hugging Face cache and HF_HUB_OFFLINE"):
        validate_recipe("qwen2.5-0.5b-lora")


def test_recipes_cli_list_show_copy_validate(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(cli, ["recipes", "list"])
    assert listing.exit_code == 0
    lines = listing.output.splitlines()
    assert lines[0].split() == ["NAME", "MEMORY", "PURPOSE"]
    assert {line.split()[0] for line in lines[1:]} == BUILTINS
    assert re.search(r"^qwen2.5-7b-qlora +\d+\.\d GiB +QLoRA on Qwen2.5 7B", listing.output, re.M)
    shown = runner.invoke(cli, ["recipes", "show", "tiny-lora"])
    assert shown.exit_code == 0 and shown.output.startswith("# purpose:")
    copied = runner.invoke(cli, ["recipes", "copy", "tiny-lora", str(tmp_path)])
    assert copied.exit_code == 0 and (tmp_path / "tiny-lora.yaml").read_text() == shown.output
    again = runner.invoke(cli, ["recipes", "copy", "tiny-lora", str(tmp_path / "tiny-lora.yaml")])
    assert again.exit_code == 1 and "already exists" in again.output
    assert copy_recipe("tiny-lora", tmp_path / "tiny-lora.yaml", force=True).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-lora.yaml"]  # no temporary left
    typo = runner.invoke(cli, ["recipes", "show", "tiny-lroa"])
    assert typo.exit_code == 1
    assert typo.output == "error: tiny-lroa: no such built-in recipe; did you mean tiny-lora?\n"
    ok = runner.invoke(cli, ["recipes", "validate", str(tmp_path / "tiny-lora.yaml")])
    assert ok.exit_code == 0 and ok.output.endswith("ok\n"), ok.output
    bad = runner.invoke(
        cli, ["recipes", "validate", str(tmp_path / "tiny-lora.yaml"), "training.lr=1"]
    )
    assert bad.exit_code == 1
    assert bad.output.startswith("error: command line: training.lr: unknown key; expected one of")
    for sub in ("list", "show", "copy", "validate"):
        assert runner.invoke(cli, ["recipes", sub, "--help"]).exit_code == 0


def test_builtin_tiny_is_built_once_into_the_cache(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    import mlxlocal.tiny

    monkeypatch.setenv("MLXLOCAL_CACHE", str(tmp_path / "cache"))
    path = resolve_source("builtin:tiny")
    assert path.parent == tmp_path / "cache" and path.name.startswith("tiny-")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # nothing half-built
    assert AutoConfig.from_pretrained(path).model_type == "llama"
    assert AutoTokenizer.from_pretrained(path).chat_template

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt the tiny model")

    monkeypatch.setattr(mlxlocal.tiny, "build_tiny_checkpoint", refuse)
    assert resolve_source("builtin:tiny") == path
    with pytest.raises(MlxLocalError, match="no such built-in model"):
        resolve_source("builtin:huge")
