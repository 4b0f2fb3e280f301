"""A disk that fills up mid-write: every writer stops with one line that says the disk is full
and where, leaves nothing half-written, and succeeds once space is freed.

The disk is a real tmpfs (2 MB; 16 MB for a training run), mounted by the test; that needs root
and a kernel that allows it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from click.testing import CliRunner
from helpers import make_adapter, write_recipe

import mlxlocal.report as report_module
import mlxlocal.train.run as train_run
from mlxlocal.chat import ChatSession, repl
from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.train.checkpoints import Position, RunDir, restore_checkpoint


def _mount(tmp_path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("platform: mounting a tmpfs to fill needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"platform: cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def disk(tmp_path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted afterwards."""
    yield from _mount(tmp_path, "2m")


@pytest.fixture
def run_disk(tmp_path) -> Iterator[Path]:
    """A 16 MB tmpfs: room for a training run's folder and its report."""
    yield from _mount(tmp_path, "16m")


def _fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the disk."""
    filler = disk / "filler"
    filler.write_bytes(bytes(max(shutil.disk_usage(disk).free - leave, 0)))
    return filler


def _full(args: list[str], out: Path, filler: Path, printed: int = 0) -> None:
    """The command fails with one line naming `out` (after the `printed` lines of a report it
    printed before writing); only the filler is left; with space freed, the same command
    succeeds."""
    runner = CliRunner()
    result = runner.invoke(cli, [*args, str(out)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    lines = result.output.strip().splitlines()[printed:]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}: the disk is full")
    assert [p.name for p in filler.parent.iterdir()] == ["filler"]
    filler.unlink()
    again = runner.invoke(cli, [*args, str(out)])
    assert again.exit_code == 0, again.output


def test_convert_safetensors(checkpoints, disk):
    _full(["convert", str(checkpoints("llama"))], disk / "out", _fill(disk, 200_000))


def test_convert_bin_while_staging(checkpoints, disk):
    """The .bin is staged as safetensors by MLX, whose write error is a bare RuntimeError."""
    _full(["convert", str(checkpoints("llama", safe=False))], disk / "out", _fill(disk, 200_000))


def test_quantize(tiny_mlx, disk):
    args = ["quantize", str(tiny_mlx), "--no-eval"]
    _full(args, disk / "out", _fill(disk, 40_000))


def test_fuse(tiny_mlx, tmp_path, disk):
    adapters = make_adapter(tiny_mlx, tmp_path / "adapters")
    _full(["fuse", str(tiny_mlx), str(adapters)], disk / "out", _fill(disk, 200_000))


def test_run_checkpoint_then_resume(disk):
    """A checkpoint that does not fit leaves the previous one in force; freed, it is written."""
    mx.random.seed(0)
    model = nn.Linear(256, 256)
    optimizer = optim.Adam(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    run = RunDir(disk / "run")
    run.prepare("a: 1\n", None)
    first = run.save_checkpoint(model, optimizer, Position(step=1, rng=[0, 1]), {}, keep=3)
    filler = _fill(disk, 100_000)  # a checkpoint is ~0.8 MB: weights + Adam's two moments
    with pytest.raises(MlxLocalError, match=f"cannot write {disk / 'run' / 'step-2'}: the disk"):
        run.save_checkpoint(model, optimizer, Position(step=2, rng=[0, 1]), {}, keep=3)
    assert run.latest() == first
    assert sorted(p.name for p in run.path.iterdir()) == ["latest", "recipe.yaml", "step-1"]
    filler.unlink()
    second = run.save_checkpoint(model, optimizer, Position(step=2, rng=[0, 1]), {}, keep=3)
    assert run.prepare("a: 1\n", True) == second
    assert restore_checkpoint(second, model, optimizer).step == 2


def test_small_file_write(disk):
    """`latest`, recipe.yaml and metrics rewrites fail whole too, with nothing left behind."""
    run = RunDir(disk / "run")
    run.prepare("a: 1\n", None)
    _fill(disk, 0)
    with pytest.raises(MlxLocalError, match="the disk is full"):
        run.prepare("a: 1\n" + "#" * 100_000 + "\n", None)
    assert sorted(p.name for p in run.path.iterdir()) == ["recipe.yaml"]


def test_export_gguf(tiny_mlx, disk):
    _full(["export", "gguf", str(tiny_mlx)], disk / "m.gguf", _fill(disk, 100_000))


def test_export_ollama(tiny_mlx, disk):
    _full(["export", "ollama", str(tiny_mlx)], disk / "out", _fill(disk, 100_000))


def test_export_then_import_peft(tiny_mlx, tmp_path, disk):
    adapters = make_adapter(tiny_mlx, tmp_path / "adapters")
    _full(["export", "peft", str(adapters)], disk / "peft", _fill(disk, 1_000))
    shutil.copytree(disk / "peft", tmp_path / "peft")
    shutil.rmtree(disk / "peft")
    args = ["import", "peft", str(tmp_path / "peft"), "--model", str(tiny_mlx)]
    filler = _fill(disk, 1_000)  # OUT comes before --model: _full's shape does not fit
    runner = CliRunner()
    result = runner.invoke(cli, [*args[:3], str(disk / "back"), *args[3:]])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(f"error: cannot write {disk / 'back'}: the disk is full")
    assert [p.name for p in disk.iterdir()] == ["filler"]
    filler.unlink()
    again = runner.invoke(cli, [*args[:3], str(disk / "back"), *args[3:]])
    assert again.exit_code == 0, again.output


def test_eval_output(tiny_mlx, tmp_path, disk):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "The film was", "completion": " great"}\n')
    args = ["eval", str(tiny_mlx), "--data", str(data), "--task", "perplexity", "--output"]
    _full(args, disk / "scores.json", _fill(disk, 0), printed=2)  # the scores, then the error


def test_batch_then_resume(tiny_mlx, tmp_path, disk):
    """A batch that runs out of space keeps the records it wrote; freed, the re-run finishes."""
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(f'{{"prompt": "Review {i}"}}\n' for i in range(4)))
    args = ["batch", str(tiny_mlx), "--input", str(rows), "--max-tokens", "2", "--output"]
    out = disk / "out.jsonl"
    filler = _fill(disk, 0)
    runner = CliRunner()
    result = runner.invoke(cli, [*args, str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0], result.output
    assert not out.exists()
    filler.unlink()
    again = runner.invoke(cli, [*args, str(out)])
    assert again.exit_code == 0, again.output
    assert len(out.read_text().splitlines()) == 4
    assert sorted(p.name for p in disk.iterdir()) == ["out.jsonl"]


def test_chat_survives_a_failed_save_and_saves_once_freed(tiny_lm, tiny_mlx, disk):
    """`/save` on a full disk is one error line and no file; the chat goes on, and the same
    `/save` writes the whole conversation once space is freed."""
    out = disk / "chat.json"
    filler = _fill(disk, 0)
    messages = ["Hello there", "What is the weather today?"]
    lines = [messages[0], f"/save {out}", messages[1], "/quit"]
    result = CliRunner().invoke(
        cli, ["chat", str(tiny_mlx), "--max-tokens", "4"], input="\n".join(lines) + "\n"
    )
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: cannot write {out}: the disk is full"), errors
    assert [p.name for p in disk.iterdir()] == ["filler"]

    # The same conversation in one session: the failed /save, space freed, the /save again.
    script = iter([messages[0], f"/save {out}", "FREE", messages[1], f"/save {out}"])

    def read():
        line = next(script, None)
        if line is None:
            raise EOFError
        if line == "FREE":
            assert [p.name for p in disk.iterdir()] == ["filler"]
            filler.unlink()
            return ""
        return line

    session, written, notes = ChatSession(tiny_lm, max_tokens=4), [], []
    repl(session, read, written.append, notes.append)
    assert len([n for n in notes if n.startswith("error:")]) == 1, notes
    assert notes[-1] == f"(saved to {out})"
    assert json.loads(out.read_text())["messages"] == session.messages
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert result.stdout == "".join(written)  # the CLI answered both messages alike
    assert [p.name for p in disk.iterdir()] == ["chat.json"]


def _fill_before(monkeypatch, owner, name: str, disk: Path, when=lambda *a, **k: True) -> None:
    """Fill `disk` just before `owner.name` is called (the first call `when` accepts)."""
    original = getattr(owner, name)

    def filled_first(*args, **kwargs):
        if when(*args, **kwargs) and not (disk / "filler").exists():
            _fill(disk, 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, filled_first)


# Where a run's last writes happen: the last step's metrics line, the final checkpoint, the
# adapters, summary.json, the report drawn after it.
RUN_STAGES = {
    "metrics": (RunDir, "log", lambda self, record: record["step"] == 2),
    "checkpoint": (RunDir, "save_checkpoint", lambda self, *a: a[2].step == 2),
    "adapters": (train_run, "save_adapters", lambda *a: True),
    "summary": (train_run, "write_text_atomic", lambda path, text: path.name == "summary.json"),
    "report": (report_module, "draw_figures", lambda *a: True),
}


@pytest.mark.parametrize("stage", RUN_STAGES)
def test_run_final_files_then_run_again(stage, mlx_checkpoints, tmp_path, run_disk, monkeypatch):
    """The disk fills as a run writes its last files: one error line naming the file, nothing
    half-written, no summary.json (not finished); freed, the same command finishes the run
    and prints what to do next. A report redrawn on a full disk keeps the page it had."""
    run_dir = run_disk / "run"
    recipe = write_recipe(
        tmp_path,
        mlx_checkpoints("llama"),
        output=str(run_dir),
        training__steps=2,
        checkpoint__every=1,
    )
    owner, name, when = RUN_STAGES[stage]
    _fill_before(monkeypatch, owner, name, run_disk, when)
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert errors[0].startswith(f"error: cannot write {run_dir}/"), errors
    assert "the disk is full" in errors[0], errors
    assert not (run_dir / "summary.json").exists()
    assert not list(run_dir.rglob(".*")), list(run_dir.rglob(".*"))  # no hidden temporaries
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    kept = "step-1" if stage in ("metrics", "checkpoint") else "step-2"
    assert (run_dir / "latest").read_text() == kept
    if stage == "checkpoint":
        assert not (run_dir / "step-2").exists()

    monkeypatch.undo()
    (run_disk / "filler").unlink()
    again = runner.invoke(cli, ["run", str(recipe)])
    assert again.exit_code == 0, again.output
    assert json.loads((run_dir / "summary.json").read_text())["total_steps"] == 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 2]
    assert "next:" in again.stdout and f"--adapter {run_dir / 'adapters'}" in again.stdout
    assert (run_dir / "adapters" / "adapters.safetensors").is_file()
    page = run_dir / "report" / "index.html"
    assert page.is_file() and not list(run_dir.rglob(".*"))
    if stage != "report":
        return
    before = page.read_bytes()
    filler = _fill(run_disk, 0)
    redraw = runner.invoke(cli, ["report", str(run_dir)])
    assert redraw.exit_code == 1 and isinstance(redraw.exception, SystemExit), redraw.output
    assert redraw.output.startswith(f"error: cannot write {run_dir / 'report'}: the disk is full")
    assert len(redraw.output.strip().splitlines()) == 1
    assert page.read_bytes() == before and not list(run_dir.rglob(".*"))
    filler.unlink()
    assert runner.invoke(cli, ["report", str(run_dir)]).exit_code == 0
