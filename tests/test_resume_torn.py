"""Resume after a torn write, and JSON outputs that never hold NaN or Infinity."""

from __future__ import annotations

import json
import math

import pytest
from helpers import write_recipe

from mlxlocal.checkpoint.jsonout import strict_dumps
from mlxlocal.errors import MlxLocalError
from mlxlocal.recipe import load_recipe
from mlxlocal.train.checkpoints import RunDir
from mlxlocal.train.run import run_recipe


def strict_lines(path) -> list[dict]:
    """Every line of a JSONL file, read as strict JSON (NaN and Infinity refused)."""

    def refuse(token: str):
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the run catches it."""


def test_a_torn_metrics_line_is_cut_on_resume(mlx_checkpoints, tmp_path, monkeypatch):
    recipe = load_recipe(
        write_recipe(tmp_path, mlx_checkpoints("llama"), training__steps=5, checkpoint__every=2)
    )
    log = RunDir.log

    def torn_at_step_4(self, record):  # the disk fills (or a kill lands) mid-line
        if record["step"] == 4:
            with open(self.metrics, "a") as f:
                f.write(strict_dumps(record)[:17])
            raise Killed
        log(self, record)

    monkeypatch.setattr(RunDir, "log", torn_at_step_4)
    with pytest.raises(Killed):
        run_recipe(recipe)
    run = tmp_path / "run"
    assert (run / "latest").read_text() == "step-2"
    assert not (run / "metrics.jsonl").read_text().endswith("\n")  # torn: step 3's line, half of 4

    monkeypatch.setattr(RunDir, "log", log)
    notes = []
    summary = run_recipe(recipe, echo=notes.append)
    assert summary.resumed_from == 2
    assert f"{run / 'metrics.jsonl'}: dropped a torn last line (line 4)" in notes
    assert [m["step"] for m in strict_lines(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_metrics_lines_are_strict_json_and_a_garbled_one_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.log({"step": 1, "loss": math.nan, "grad_norm": math.inf})
    assert strict_lines(run.metrics) == [{"step": 1, "loss": None, "grad_norm": None}]
    # An older file with NaN in it, and a line of a step after the checkpoint: both made right.
    run.metrics.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.0}\n')
    run._truncate_metrics(1, print)
    assert strict_lines(run.metrics) == [{"step": 1, "loss": None}]

    run.metrics.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(MlxLocalError, match=r"metrics.jsonl line 2 is not a JSON object: delete"):
        run._truncate_metrics(2, print)


def test_a_full_disk_while_logging_is_one_error(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.symlink_to("/dev/full")  # every write: ENOSPC
    full = r"cannot write .*metrics.jsonl: the disk is full \(No space left on "
    with pytest.raises(MlxLocalError, match=full):
        run.log({"step": 1, "loss": 1.0})


def test_strict_dumps_writes_null_for_every_non_finite_float():
    value = {"a": [1.5, math.nan, (math.inf, -math.inf)], "b": {"c": math.nan}, "d": "NaN"}
    text = strict_dumps(value, indent=2)
    assert json.loads(text) == {"a": [1.5, None, [None, None]], "b": {"c": None}, "d": "NaN"}
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text


def test_a_batch_record_holding_nan_is_a_bad_record_and_a_skipped_one_resumes(tiny_lm, tmp_path):
    import mlxlocal

    lines = ['{"id": 1, "text": "a"}', '{"id": NaN, "text": "b"}', '{"id": 3, "x": [Infinity]}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(MlxLocalError, match=r"in\.jsonl:2: id is NaN or Infinity, which JSON"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, max_tokens=2)
    assert [r["id"] for r in strict_lines(tmp_path / "out.jsonl.partial")] == [1]
    settings = (tmp_path / "out.jsonl.partial-settings.json").read_text()

    result = mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, max_tokens=2, on_error="skip")
    assert result.resumed == 1 and len(result.errors) == 2 and "x[0] is NaN" in result.errors[1]
    records = strict_lines(out)
    assert [r["id"] for r in records] == [1, None, 3] and records[2]["x"] == [None]
    assert "error" in records[1] and "output" in records[0]

    # Killed after the skipped record: the re-run matches its id (null) and goes on.
    (tmp_path / "out.jsonl.partial-settings.json").write_text(settings)
    (tmp_path / "out.jsonl.partial").write_text("".join(out.read_text().splitlines(True)[:2]))
    out.unlink()
    again = mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, max_tokens=2, on_error="skip")
    assert again.resumed == 2 and strict_lines(out) == records
