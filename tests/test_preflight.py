"""`recipes validate` raises every error `run` can raise before its first training step.

Each case of the table is a recipe mistake; the test runs both `validate_recipe` and
`run_recipe` on it and asserts the same one-line error, with nothing trained (no metrics, no
checkpoint). Errors that need the weights in memory (`training.loss_chunk_size` against the
architecture's output head) and `--resume` (a flag, not a recipe setting) are run's alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.recipe import dump_recipe, load_recipe
from mlxlocal.train.preflight import validate_recipe
from mlxlocal.train.run import run_recipe


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _labelled(path: Path, labels: list[str]) -> str:
    return _jsonl(path, [{"prompt": f"review {i}", "completion": c} for i, c in enumerate(labels)])


@pytest.fixture(scope="module")
def models(tiny_mlx, tmp_path_factory):
    """The tiny MLX model, an 8-bit copy, and a copy whose tokenizer has no chat template."""
    from mlxlocal.quantize import quantize

    root = tmp_path_factory.mktemp("preflight-models")
    quantize(tiny_mlx, root / "q8", bits=8, group_size=32, evaluate=False)
    plain = root / "no-template"
    shutil.copytree(tiny_mlx, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    return {"float": tiny_mlx, "q8": root / "q8", "plain": plain}


def _output_file(d: Path) -> list[str]:
    (d / "taken").write_text("x")
    return [f"output={d / 'taken'}"]


def _foreign_dir(d: Path) -> list[str]:
    (d / "photos").mkdir()
    (d / "photos" / "cat.jpg").write_text("x")
    return [f"output={d / 'photos'}"]


def _finished(d: Path) -> list[str]:
    (d / "run").mkdir()
    (d / "run" / "summary.json").write_text("{}")
    shutil.copy(d / "recipe.yaml", d / "run" / "recipe.yaml")
    return []


def _checkpoint_of_another_recipe(d: Path) -> list[str]:
    other = load_recipe(d / "recipe.yaml", ["training.learning_rate=0.5"])
    run = d / "run"
    (run / "step-2").mkdir(parents=True)
    (run / "step-2" / "state.json").write_text("{}")
    (run / "latest").write_text("step-2")
    (run / "recipe.yaml").write_text(dump_recipe(other))
    return []


_DPO = ["method.objective=dpo", "data.train=builtin:polite-train.jsonl"]


def _wide_adapter(d: Path) -> Path:
    """A LoRA adapter for a model twice as wide as the tiny one."""
    import mlx.core as mx

    out = d / "adapter"
    out.mkdir()
    name = "model.layers.0.self_attn.q_proj"
    tensors = {f"{name}.lora_a": mx.zeros((128, 4)), f"{name}.lora_b": mx.zeros((4, 128))}
    mx.save_safetensors(str(out / "adapters.safetensors"), tensors)
    config = {"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0}}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


# (id, files and overrides for the mistake, the error's pattern)
CASES = [
    ("output is a file", _output_file, "is a file: choose a directory"),
    ("output holds other files", _foreign_dir, "is not a training run"),
    ("output holds a finished run", _finished, "holds a finished run"),
    ("output holds another recipe's checkpoint", _checkpoint_of_another_recipe, "different"),
    ("no such model", lambda d: [f"model.path={d / 'nope'}"], "nope"),
    ("layers beyond the model's", lambda d: ["method.layers=[5]"], "method.layers"),
    (
        "quantize a quantized model",
        lambda d: ["model.path=@q8", "model.quantize={bits: 4}"],
        "already quantized",
    ),
    ("full fine-tuning of a quantized model", lambda d: ["model.path=@q8", "@full"], "quantized"),
    (
        "examples longer than the context",
        lambda d: [
            "data.max_length=100000",
            f"data.train={_jsonl(d / 'long.jsonl', [{'text': 'fox ' * 400}])}",
        ],
        "above the model's context of 256",
    ),
    ("no such data file", lambda d: [f"data.train={d / 'missing.jsonl'}"], "no such data file"),
    (
        "a broken line",
        lambda d: [f"data.train={_jsonl(d / 'b.jsonl', [{'text': 'ok'}, '{oops'])}"],
        r"b.jsonl:2:",
    ),
    ("an empty file", lambda d: [f"data.train={_jsonl(d / 'e.jsonl', [])}"], "no examples"),
    (
        "an unknown format",
        lambda d: [f"data.train={_jsonl(d / 'u.jsonl', [{'question': 'q'}])}"],
        "cannot tell the data format",
    ),
    (
        "another encoding",
        lambda d: (
            [f"data.train={d / 'l.jsonl'}"]
            if (d / "l.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
            else []
        ),
        "--encoding",
    ),
    (
        "chat data without a chat template",
        lambda d: ["model.path=@plain"],
        "needs the model's chat template",
    ),
    (
        "every example dropped",
        lambda d: ["data.max_length=2", "data.too_long=drop"],
        "every example was dropped",
    ),
    (
        "fewer batches than one step",
        lambda d: ["training.steps=null", "training.epochs=1", "training.grad_accumulation=1000"],
        "fewer than one step",
    ),
    (
        "no such eval data",
        lambda d: ["eval.task=classify", f"eval.data={d / 'gone.jsonl'}"],
        "gone.jsonl",
    ),
    (
        "classify on plain text",
        lambda d: ["eval.task=classify", f"eval.data={_jsonl(d / 't.jsonl', [{'text': 'x'}])}"],
        "classify needs a label",
    ),
    (
        "a label the eval data lacks",
        lambda d: [
            "eval.task=classify",
            f"eval.data={_labelled(d / 'c.jsonl', ['good', 'bad', 'meh'])}",
            "eval.labels=[good, bad]",
        ],
        "the data has label 'meh'",
    ),
    (
        "one label only",
        lambda d: ["eval.task=classify", f"eval.data={_labelled(d / 'o.jsonl', ['good'] * 3)}"],
        "at least two labels",
    ),
    (
        "a label of no tokens",
        lambda d: [
            "eval.task=classify",
            f"eval.data={_labelled(d / 'n.jsonl', ['good', 'bad'])}",
            "eval.labels=[good, bad, ' ']",
        ],
        "becomes no tokens",
    ),
    ("no such reference", lambda d: [*_DPO, f"method.reference={d / 'sft'}"], "no such folder"),
    (
        "a reference that is no model",
        lambda d: [*_DPO, f"method.reference={d}"],  # holds recipe.yaml only
        "neither a model folder",
    ),
    (
        "a reference adapter of another model size",
        lambda d: [*_DPO, f"method.reference={_wide_adapter(d)}"],
        "another model size",
    ),
    (
        "a row without its answer",
        lambda d: [
            "eval.task=generate",
            f"eval.data={_jsonl(d / 'a.jsonl', [{'prompt': 'p', 'completion': ''}])}",
        ],
        "empty 'completion'",
    ),
]


def _recipe(folder: Path, models: dict, overrides: list[str]) -> tuple[Path, list[str]]:
    """The tiny recipe, with `@NAME` overrides naming the test models or a full fine-tune."""
    recipe = {
        "model": {"path": str(models["float"]), "dtype": "float32"},
        "data": {"train": "builtin:tiny-chat.jsonl", "max_length": 128},
        "method": {"type": "lora", "rank": 4, "alpha": 8},
        "training": {"learning_rate": 2e-3, "batch_size": 4, "steps": 6},
        "output": str(folder / "run"),
    }
    if "@full" in overrides:
        recipe["method"] = {"type": "full"}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    resolved = []
    for o in overrides:
        if o == "@full":
            continue
        for name, model in models.items():
            o = o.replace(f"=@{name}", f"={model}")
        resolved.append(o)
    return path, resolved


@pytest.mark.parametrize("case, mistake, pattern", CASES, ids=[c[0] for c in CASES])
def test_validate_raises_what_run_would_before_training(models, tmp_path, case, mistake, pattern):
    path, _ = _recipe(tmp_path, models, [])
    path, overrides = _recipe(tmp_path, models, mistake(tmp_path))
    with pytest.raises(MlxLocalError, match=pattern) as validated:
        validate_recipe(path, overrides)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(MlxLocalError) as ran:
        run_recipe(load_recipe(path, overrides))
    assert str(ran.value) == str(validated.value)
    run = tmp_path / "run"
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()
    assert not (run / "adapters").exists()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert set(after) - set(before) <= {Path("run"), Path("run/recipe.yaml")}  # an attempt


def test_a_sound_recipe_validates_and_reports_what_run_will_do(models, tmp_path):
    data = _labelled(tmp_path / "eval.jsonl", ["good", "bad", "good"])
    path, overrides = _recipe(tmp_path, models, ["eval.task=classify", f"eval.data={data}"])
    result = CliRunner().invoke(cli, ["recipes", "validate", str(path), *overrides])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "training: 6 steps" in lines and "eval classify: ok" in lines
    assert any(
        line.startswith("data train: builtin:tiny-chat.jsonl: 72 examples") for line in lines
    )
    assert lines[-1] == "ok"
    assert not (tmp_path / "run").exists()  # validate writes nothing


def test_validate_notes_a_failed_attempt_that_run_will_replace(models, tmp_path):
    path, _ = _recipe(tmp_path, models, [])
    (tmp_path / "run").mkdir()
    other = load_recipe(path, ["training.learning_rate=0.5"])
    (tmp_path / "run" / "recipe.yaml").write_text(dump_recipe(other))
    report = validate_recipe(path)
    assert any("only a failed attempt" in line and "learning_rate" in line for line in report)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == dump_recipe(other)  # untouched
