"""`mlxlocal run` as a person runs it: Ctrl-C prints the command that continues (and it does,
exactly), --extend continues a finished run exactly, the commands printed at the end work as
printed, progress lines appear outside a terminal, and a QLoRA run's evaluation is reproduced
from its run folder.

Every training run here is a real child `mlxlocal run` that compiles its step, as users' runs do.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from helpers import (
    CLI,
    assert_same_run,
    compiling_env,
    finished_run,
    read_metrics,
    uninterrupted_run,
    write_recipe,
)

from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.recipe import load_recipe
from mlxlocal.train.run import rerun_command, run_recipe

STEPS = 10


@pytest.fixture(scope="module")
def recipe(mlx_checkpoints, tmp_path_factory):
    """Dropout (RNG), accumulation across epochs, warmup then a constant rate, clipping: all
    must carry over a stop. (A decaying schedule depends on the total, which --extend changes.)"""
    return write_recipe(
        tmp_path_factory.mktemp("flow"),
        mlx_checkpoints("llama"),
        method={"type": "lora", "rank": 4, "dropout": 0.1},
        training__steps=STEPS,
        training__grad_accumulation=2,
        training__warmup_steps=2,
        training__grad_clip=1.0,
        checkpoint__keep=2,
    )


@pytest.fixture(scope="module")
def uninterrupted(recipe):
    return uninterrupted_run(recipe)


def as_run(command: str) -> list[str]:
    """A printed `mlxlocal …` line as this test's child process runs it."""
    words = shlex.split(command)
    assert words[0] == "mlxlocal", command
    return [*CLI, *words[1:]]


def test_ctrl_c_saves_the_step_and_prints_the_command_that_continues_exactly(
    recipe, uninterrupted, tmp_path
):
    run = tmp_path / "run"
    args = [*CLI, "run", str(recipe), f"output={run}"]
    child = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=compiling_env()
    )
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert child.poll() is None, child.communicate()[1]
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)  # as Ctrl-C in a terminal
    out, err = child.communicate(timeout=600)
    assert child.returncode == 130, err
    stopped = int((run / "latest").read_text().removeprefix("step-"))
    assert 2 <= stopped < STEPS and not (run / "summary.json").exists()
    assert read_metrics(run)[-1]["step"] == stopped  # the step under way finished and was saved
    lines = err.splitlines()
    saved = run / f"step-{stopped}"
    at = lines.index(f"stopped after step {stopped} (saved in {saved}); to continue:")
    command = lines[at + 1].strip()
    assert command == shlex.join(["mlxlocal", "run", str(recipe), f"output={run}"])

    resumed = subprocess.run(
        as_run(command),
        capture_output=True,
        text=True,
        env={**compiling_env(), "MLXLOCAL_PROGRESS_SECONDS": "0"},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {stopped}" in resumed.stdout
    assert_same_run(uninterrupted, run, STEPS)
    # Outside a terminal (stderr is a pipe here) progress comes as plain lines.
    progress = [x for x in resumed.stderr.splitlines() if x.startswith("training: ")]
    assert progress and progress[-1].startswith(f"training: {STEPS}/{STEPS} step (100%), ")
    assert "\r" not in resumed.stderr


def test_a_finished_run_continues_exactly_with_extend_or_more_steps(
    recipe, uninterrupted, tmp_path, compiled
):
    run = tmp_path / "run"
    same = ["run", str(recipe), f"output={run}"]
    assert CliRunner().invoke(cli, [*same, "training.steps=6"]).exit_code == 0
    with pytest.raises(
        MlxLocalError, match=r"holds a finished run.*--extend N \(it stopped at 6\)"
    ):
        run_recipe(load_recipe(recipe, [f"output={run}", "training.steps=6"]))
    raised = CliRunner().invoke(cli, [*same, "training.steps=8"])  # a higher training.steps
    assert raised.exit_code == 0, raised.output
    assert "resumed at step 6" in raised.output
    extended = CliRunner().invoke(cli, [*same, "training.steps=6", "--extend", "2"])  # 8 + 2
    assert extended.exit_code == 0, extended.output
    assert "trained lora for 10 steps (resumed at step 8)" in extended.output
    assert_same_run(uninterrupted, run, STEPS)
    assert json.loads((run / "summary.json").read_text())["total_steps"] == STEPS


def test_extend_needs_a_finished_run_and_an_extension_stopped_continues_by_its_length(
    recipe, tmp_path
):
    loaded = load_recipe(recipe, [f"output={tmp_path / 'run'}"])
    with pytest.raises(MlxLocalError, match="--extend: .* holds no finished run; run without"):
        run_recipe(loaded, extend=3)
    # Stopped before the extension began: the same line. After: the new length, not --extend
    # again (that would add another 3).
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    line = rerun_command(loaded, "r.yaml", ["a.b=1"], extend=3)
    assert line == "mlxlocal run r.yaml a.b=1 --extend 3"
    (tmp_path / "run" / "summary.json").unlink()
    (tmp_path / "run" / "recipe.yaml").write_text("training:\n  steps: 13\n")
    line = rerun_command(loaded, "r.yaml", ["a.b=1"], extend=3)
    assert line == "mlxlocal run r.yaml a.b=1 training.steps=13"


@pytest.fixture(scope="module")
def qlora_run(mlx_checkpoints, tmp_path_factory):
    """A QLoRA run (the run quantizes its float base) that scores perplexity before and after."""
    folder = tmp_path_factory.mktemp("qlora")
    recipe = write_recipe(
        folder,
        mlx_checkpoints("llama"),
        model__quantize={"bits": 4, "group_size": 32},
        data__valid="builtin:tiny-chat.jsonl",
        eval={"task": "perplexity", "limit": 24},
        training__steps=4,
    )
    lines = finished_run(recipe).stdout.splitlines()
    return folder / "run", [line.strip() for line in lines[lines.index("next:") + 1 :]]


def test_the_commands_printed_after_a_run_work_as_printed(qlora_run, mlx_checkpoints, tmp_path):
    run, commands = qlora_run
    base = mlx_checkpoints("llama")
    adapters = f"{base} --adapter {run / 'adapters'}"
    assert commands == [
        f"mlxlocal chat {adapters}",
        f"mlxlocal eval {adapters} --data builtin:tiny-chat.jsonl --task perplexity --limit 24",
        f"mlxlocal fuse {base} {run / 'adapters'} {run / 'fused'}",
        f"mlxlocal export gguf {run / 'fused'} {run / 'model.gguf'}",
        f"mlxlocal report {run}",
    ]
    for command in commands:
        done = subprocess.run(
            as_run(command), input="Hi\n", capture_output=True, text=True, env=compiling_env()
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
    # QLoRA adapters fuse into the base quantized as in training, and mlx-lm opens the result.
    from mlx_lm import load as mlx_load

    assert json.loads((run / "fused" / "config.json").read_text())["quantization"]["bits"] == 4
    mlx_load(str(run / "fused"))
    assert (run / "model.gguf").stat().st_size > 0


def test_a_qlora_runs_evaluation_is_reproduced_from_its_run_folder(qlora_run, tmp_path):
    run, commands = qlora_run
    recorded = json.loads((run / "evaluation.json").read_text())["after"]
    evaluation = next(c for c in commands if c.startswith("mlxlocal eval "))
    out = tmp_path / "eval.json"
    done = CliRunner().invoke(cli, [*shlex.split(evaluation)[1:], "--output", str(out)])
    assert done.exit_code == 0, done.output
    again = json.loads(out.read_text())
    assert again["metrics"]["examples"] == recorded["metrics"]["examples"] == 24
    assert again["metrics"]["nll"] == pytest.approx(recorded["metrics"]["nll"], abs=1e-4)
    for a, b in zip(recorded["examples"], again["examples"], strict=True):
        assert b["nll"] == pytest.approx(a["nll"], abs=1e-4)

    # The same adapters over the float base (what --adapter did before it applied the
    # recorded quantization) score measurably differently: the check above can fail.
    from mlx_lm import load as mlx_load

    from mlxlocal.adapters.files import read_adapter
    from mlxlocal.adapters.layers import apply_adapter
    from mlxlocal.evaluate import evaluate
    from mlxlocal.generate import LoadedModel

    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    model, tokenizer = mlx_load(config["mlxlocal"]["model"])
    apply_adapter(model, read_adapter(run / "adapters"))
    float_base = LoadedModel(model, tokenizer, 256, run)
    drift = evaluate(float_base, "builtin:tiny-chat.jsonl", "perplexity", limit=24)
    assert abs(drift.metrics["nll"] - recorded["metrics"]["nll"]) > 1e-3
