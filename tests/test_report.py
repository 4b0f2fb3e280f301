"""`mlxlocal report RUN` and `info` on adapters and run directories, from a real tiny run.

One child `mlxlocal run` (validation, a classify task before and after, clipping) makes the
files; the report drawn from them is checked as files, as HTML, and in a real headless
browser (Debian's chromium, tests/browser.py).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from helpers import CLI, compiling_env, finished_run, read_metrics, write_recipe
from serving import loopback_only as no_network  # noqa: F401 - chromedriver is on loopback

from mlxlocal.cli import cli

STEPS = 6
CLIP = 0.5  # low enough that the tiny model's first steps are clipped
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = {
    "loss_steps.png",
    "loss_tokens.png",
    "learning_rate.png",
    "grad_norm.png",
    "tokens_per_s.png",
    "peak_memory.png",
    "scores.png",
    "confusion.png",
}


@pytest.fixture(scope="module")
def finished(mlx_checkpoints, tmp_path_factory):
    """A finished run and what `run` printed."""
    folder = tmp_path_factory.mktemp("report")
    recipe = write_recipe(
        folder,
        mlx_checkpoints("llama"),
        data__train="builtin:sentiment-train.jsonl",
        data__valid="builtin:sentiment-test.jsonl",
        eval={"task": "classify", "limit": 8, "every": 2, "batches": 1},
        training__steps=STEPS,
        training__grad_clip=CLIP,
        checkpoint__every=2,
    )
    return folder / "run", finished_run(recipe).stdout.splitlines()


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_run_writes_the_report_and_the_printed_command_redraws_it(finished):
    run, lines = finished
    page = run / "report" / "index.html"
    assert f"report: {page}" in lines
    command = lines[lines.index("next:") + 1 :][-1].strip()
    assert command == f"mlxlocal report {run}"
    page.unlink()  # the printed command makes it again
    done = subprocess.run(
        [*CLI, *shlex.split(command)[1:]], capture_output=True, text=True, env=compiling_env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {page}"
    assert page.is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".report.")]  # nothing torn


def test_the_page_shows_every_figure_from_the_runs_files_and_nothing_remote(finished):
    run, _ = finished
    folder = run / "report"
    assert {p.name for p in folder.glob("*.png")} == FIGURES
    for name in FIGURES:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    text = (folder / "index.html").read_text()
    for name in FIGURES:
        assert f'src="{name}"' in text
    assert "http://" not in text and "https://" not in text and "<script" not in text
    # The numbers on the page are the run's: clipped steps, status, last step, the recipe.
    metrics = read_metrics(run)
    clipped = sum(m["grad_norm"] > CLIP for m in metrics)
    assert 0 < clipped  # the marks have something to show
    assert f"{clipped} of {STEPS} steps clipped to {CLIP}" in text
    assert "<th>status</th><td>finished</td>" in text
    assert f"<th>last step</th><td>{STEPS}</td>" in text
    assert "grad_clip: 0.5" in text  # the recipe, as the run resolved it
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert "confusion" in evaluation["after"]["metrics"]  # what the confusion figure draws


def test_a_headless_browser_renders_the_page_without_console_errors(finished, browser):
    run, _ = finished
    page = run / "report" / "index.html"
    browser.get_log("browser")  # drop what earlier pages said
    browser.get(page.as_uri())
    images = browser.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    assert {src for src, _, _ in images} == FIGURES
    assert all(complete and width > 0 for _, complete, width in images), images
    assert browser.get_log("browser") == []
    assert browser.title == f"mlxlocal report: {run.name}"
    shot = os.environ.get("MLXLOCAL_REPORT_SCREENSHOT")  # for a person to look at
    if shot:
        browser.save_screenshot(shot)


def test_info_describes_the_runs_adapters(finished):
    import mlx.core as mx

    run, _ = finished
    result = invoke("info", run / "adapters", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    weights = mx.load(str(run / "adapters" / "adapters.safetensors"))
    assert data["kind"] == "adapter" and data["method"] == "lora" and data["rank"] == 4
    assert data["targets"] == config["lora_parameters"]["keys"] and data["targets"]
    assert data["base"] == config["mlxlocal"]["model"]
    assert data["parameters"] == sum(v.size for v in weights.values())
    assert data["size_bytes"] == (run / "adapters" / "adapters.safetensors").stat().st_size
    table = invoke("info", run / "adapters").output
    assert "method" in table and "rank" in table and "targets" in table


def test_info_describes_the_run_and_its_status(finished, tmp_path):
    run, _ = finished
    data = json.loads(invoke("info", run, "--json").output)
    val = [m["val_loss"] for m in read_metrics(run) if "val_loss" in m]
    assert len(val) == STEPS // 2
    assert data["status"] == "finished" and data["last step"] == STEPS
    assert data["best validation loss"] == f"{min(val):.4f}"
    assert data["report"] == str(run / "report" / "index.html")
    assert "status" in invoke("info", run).output

    # Without summary.json: running while the recorded process lives, failed once it is gone.
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report", "step-*", "adapters"))
    (copy / "summary.json").unlink()
    (copy / "running").write_text(str(os.getpid()))
    data = json.loads(invoke("info", copy, "--json").output)
    assert data["status"] == f"running (pid {os.getpid()})"
    assert data["report"].startswith("none yet")
    child = subprocess.Popen(["true"])  # a process that has exited (and been reaped)
    child.wait()
    (copy / "running").write_text(str(child.pid))
    assert json.loads(invoke("info", copy, "--json").output)["status"] == "failed"


def test_bad_runs_get_one_clear_line(finished, tmp_path):
    from test_bad_input import assert_clean_failure

    assert_clean_failure(invoke("report", tmp_path / "nowhere"), "no such run directory")
    (tmp_path / "plain").mkdir()
    assert_clean_failure(invoke("report", tmp_path / "plain"), "not a training run")
    run, _ = finished
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "recipe.yaml", empty)
    assert_clean_failure(invoke("report", empty), "no training metrics")
    (empty / "metrics.jsonl").write_text("")
    assert_clean_failure(invoke("report", empty), "no training metrics")
    assert_clean_failure(invoke("info", empty), "no training metrics")
    assert not (empty / "report").exists()


def test_checkpoints_refresh_the_report_at_most_once_per_interval(finished, tmp_path):
    from mlxlocal.report import Refresher

    run, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report", "step-*", "adapters"))
    Refresher(copy, every=3600).checkpoint()
    assert not (copy / "report").exists()  # the last drawing (the start) is too recent
    Refresher(copy, every=0).checkpoint()
    assert (copy / "report" / "index.html").is_file()
