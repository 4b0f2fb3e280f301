"""Exact resume: a run killed with SIGKILL and started again goes on as if never stopped.

Every run here compiles its training step (`mx.compile`), as users' runs do."""

from __future__ import annotations

import pytest
from helpers import (
    SCHEDULED_RUN,
    assert_same_run,
    finished_run,
    killed_run,
    read_metrics,
    uninterrupted_run,
    write_recipe,
)
from helpers import run_cli as mlxlocal

from mlxlocal.recipe import dump_recipe, load_recipe


@pytest.fixture(scope="module")
def recipe(mlx_checkpoints, tmp_path_factory):
    """Dropout (RNG), accumulation across epochs, warmup + cosine: all must resume exactly."""
    folder = tmp_path_factory.mktemp("resume")
    return write_recipe(
        folder,
        mlx_checkpoints("llama"),
        method={"type": "lora", "rank": 4, "dropout": 0.1},
        training__steps=10,
        training__grad_accumulation=2,
        checkpoint__every=3,
        **SCHEDULED_RUN,
    )


@pytest.fixture(scope="module")
def uninterrupted(recipe):
    return uninterrupted_run(recipe)


@pytest.mark.parametrize(("moment", "kill_at", "resumes_at"), [
    ("mid-checkpoint", 6, 3),  # killed while writing step-6/: step-3 stays the latest
    ("after-step", 8, 6),  # killed between checkpoints
])  # fmt: skip
def test_a_killed_run_resumes_exactly(recipe, uninterrupted, tmp_path, moment, kill_at, resumes_at):
    run = tmp_path / "run"
    killed_run(recipe, run, kill_at, moment)
    assert (run / "latest").read_text() == f"step-{resumes_at}"
    assert not (run / f"step-{kill_at}").exists() or moment == "after-step"
    for ckpt in run.glob("step-*"):  # every checkpoint is whole
        assert {p.name for p in ckpt.iterdir()} == {
            "adapters.safetensors",
            "adapter_config.json",
            "optimizer.safetensors",
            "state.json",
        }
    assert read_metrics(run)[-1]["step"] == kill_at

    resumed = finished_run(recipe, run, "--resume")
    assert f"resumed at step {resumes_at}" in resumed.stdout
    assert not list(run.glob(".*tmp*"))  # the half-written checkpoint was swept away

    assert_same_run(uninterrupted, run, 10)


def test_resume_without_a_checkpoint_or_with_another_recipe_is_refused(recipe, tmp_path):
    run = tmp_path / "run"
    refused = mlxlocal("run", str(recipe), f"output={run}", "--resume")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: --resume: {run} has no complete checkpoint; run without --resume to start over"
    ]
    run.mkdir()  # a run of the same recipe but another learning rate, with a checkpoint
    other_rate = load_recipe(recipe, [f"output={run}", "training.learning_rate=0.1"])
    (run / "recipe.yaml").write_text(dump_recipe(other_rate))
    (run / "step-2").mkdir()
    (run / "step-2" / "state.json").write_text("{}")
    (run / "latest").write_text("step-2")
    other = mlxlocal("run", str(recipe), f"output={run}")
    assert other.returncode == 1
    assert "different recipe (training.learning_rate differs)" in other.stderr
    assert (run / "step-2" / "state.json").exists()  # the user's checkpoint is kept


def test_a_failed_attempt_is_replaced_by_the_corrected_run(recipe, tmp_path):
    """A run that failed before its first checkpoint locks nothing: the next run replaces it."""
    run = tmp_path / "run"
    failed = mlxlocal("run", str(recipe), f"output={run}", "data.train=missing.jsonl")
    assert failed.returncode == 1 and "missing.jsonl" in failed.stderr
    assert (run / "recipe.yaml").exists() and (run / "mine.txt").write_text("keep") == 4
    (run / "step-99").mkdir()  # torn: no state.json, no `latest`
    corrected = finished_run(recipe, run, "training.steps=4")
    notes = [line for line in corrected.stderr.splitlines() if "failed attempt" in line]
    assert len(notes) == 1 and "data.train" in notes[0] and str(run) in notes[0]
    assert (run / "summary.json").exists() and (run / "mine.txt").read_text() == "keep"
    assert not (run / "step-99").exists()
    saved = load_recipe(run / "recipe.yaml")
    assert saved.training.steps == 4 and saved.data.train.endswith(".jsonl")
    assert saved.data.train == load_recipe(recipe).data.train
