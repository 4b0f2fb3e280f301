"""A training run's directory, its atomic checkpoints, and exact resume.

<run>/recipe.yaml     the resolved recipe (a resumed run must match it, but for its length)
<run>/metrics.jsonl   one JSON line per optimizer step (a NaN or infinite value is written as
                      null: see checkpoint/jsonout.py)
<run>/step-<N>/       adapters.safetensors + adapter_config.json (loadable as they are),
                      optimizer.safetensors, state.json (step, data position, RNG key,
                      world size, ...)
<run>/latest          the name of the newest complete checkpoint, replaced only after it is
                      whole, so a kill at any moment leaves the previous one in force; the
                      last step and a step stopped by Ctrl-C are always checkpointed
<run>/adapters/       the final adapters
<run>/summary.json    written last: the run finished (until a longer recipe continues it)
<run>/running         the process id of the `mlxlocal run` training it, while one does
<run>/report/         index.html and its figures (report.py), refreshed as the run goes
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten, tree_map_with_path

from ..adapters.layers import save_adapters
from ..checkpoint.atomic import atomic_directory, disk_errors
from ..checkpoint.inputs import JSONProblem, decode_json, load_yaml, read_json, read_text
from ..checkpoint.jsonout import strict_dumps
from ..errors import MlxLocalError

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where training stands: enough, with weights and optimizer state, to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index within `epoch` of the next batch to train on
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    rng: list[int] = field(default_factory=list)
    loss: float | None = None  # of the last step
    world_size: int = 1  # ranks that trained it (the data each step saw depends on it)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.path / "latest"
        if not pointer.exists():
            return None
        ckpt = self.path / pointer.read_text().strip()
        return ckpt if (ckpt / "state.json").exists() else None

    def recipe_steps(self) -> int | None:
        """`training.steps` of the recipe the run holds, if it has one."""
        saved = self.path / "recipe.yaml"
        if not saved.exists():
            return None
        recipe = load_yaml(read_text(saved, "recipe"), str(saved), "recipes")[0]
        training = recipe.get("training") if isinstance(recipe, dict) else None
        return training.get("steps") if isinstance(training, dict) else None

    def check(self, recipe_yaml: str, resume: bool | None, steps: int | None = None) -> str | None:
        """What `prepare` would refuse, raised, without touching anything; or, when the
        directory holds only a failed attempt of another recipe, the note on replacing it.

        The recipe may differ from the run's in its length only (`training.steps`/`epochs`);
        `steps` above a finished run's own continues it."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise MlxLocalError(f"output {p} is a file: choose a directory for the run")
        if p.exists() and any(p.iterdir()) and not (p / "recipe.yaml").exists():
            raise MlxLocalError(
                f"output {p} exists and is not a training run: choose another output"
            )
        replace = None
        if (p / "recipe.yaml").exists():
            diff = _recipe_difference(p / "recipe.yaml", recipe_yaml)
            if diff is not None and self.latest() is None:
                replace = (
                    f"replacing {p}: it holds only a failed attempt ({diff or 'the recipe'} "
                    "differed; no checkpoint was written)"
                )
            elif diff is not None:
                raise MlxLocalError(
                    f"output {p} holds a run of a different recipe ({diff or 'the recipe'} "
                    "differs): choose another output, or delete it to start over"
                )
        if (p / "summary.json").exists():
            self._finished_step(steps)
        if resume and self.latest() is None:
            raise MlxLocalError(
                f"--resume: {p} has no complete checkpoint; run without --resume to start over"
            )
        return replace

    def prepare(
        self,
        recipe_yaml: str,
        resume: bool | None,
        note: Callable[[str], None] = lambda _: None,
        steps: int | None = None,
    ) -> Path | None:
        """Create or reopen the run directory; return the checkpoint to resume from, if any.

        `resume` None resumes when a complete checkpoint exists; True insists on one. `note`
        hears what was repaired (a metrics line torn by a kill or a full disk) or replaced (a
        failed attempt of another recipe). `steps` above a finished run's own continues it (it
        is no longer finished).
        """
        p = self.path
        replace = self.check(recipe_yaml, resume, steps)
        for stale in p.glob(".*.tmp-*"):  # left by a kill during a write
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        if replace:
            note(replace)
            model = yaml.safe_load(recipe_yaml).get("model")
            old = load_yaml(read_text(p / "recipe.yaml", "recipe"), str(p), "recipes")[0]
            self._clear_attempt(keep_model=isinstance(old, dict) and old.get("model") == model)
        if (p / "summary.json").exists():
            note(
                f"continuing the finished run {p} from step {self._finished_step(steps)} to {steps}"
            )
            (p / "summary.json").unlink()
        ckpt = self.latest()
        p.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p / "recipe.yaml", recipe_yaml)
        step = read_position(ckpt).step if ckpt else 0
        self._truncate_metrics(step, note)
        return ckpt

    def _finished_step(self, steps: int | None) -> int:
        """The step a finished run stopped at, when `steps` goes beyond it; else refused."""
        ckpt = self.latest()
        done = read_position(ckpt).step if ckpt else None
        if steps is None or done is None or steps <= done:
            how = "" if done is None else f", continue it with --extend N (it stopped at {done})"
            raise MlxLocalError(
                f"output {self.path} holds a finished run (see {self.path / 'summary.json'})"
                f"{how}, choose another output, or delete it"
            )
        return done

    # What a run writes into its directory: a failed attempt's are replaced, nothing else.
    ATTEMPT_FILES = (
        "recipe.yaml",
        "metrics.jsonl",
        "latest",
        "evaluation.json",
        "running",
        "reference-train.npz",
        "reference-valid.npz",
    )
    ATTEMPT_DIRS = ("adapters", "report")

    def _clear_attempt(self, keep_model: bool) -> None:
        """Remove what a failed attempt wrote (no complete checkpoint, no summary): its files,
        torn step folders, and the converted base unless the model is the same."""
        p = self.path
        for name in self.ATTEMPT_FILES:
            (p / name).unlink(missing_ok=True)
        folders = [*self.ATTEMPT_DIRS, *(d.name for d in p.iterdir() if STEP_DIR.match(d.name))]
        if not keep_model:
            folders.append("model")
        for name in folders:
            if (p / name).is_dir():
                shutil.rmtree(p / name)

    def records(self) -> list[dict[str, Any]]:
        """The metrics lines written so far; a torn last line (a run under way) is left out."""
        lines = self.metrics.read_bytes().split(b"\n")
        return [r for line in lines if line.strip() and (r := _metrics_record(line)) is not None]

    def mark_running(self) -> Callable[[], None]:
        """Record this process as the one training the run; return what forgets it again."""
        write_text_atomic(self.path / "running", str(os.getpid()))
        return lambda: (self.path / "running").unlink(missing_ok=True)

    def running_pid(self) -> int | None:
        """The process recorded as training the run, if one is (it may have died since)."""
        try:
            return int((self.path / "running").read_text().strip())
        except (OSError, ValueError):
            return None

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line; a failed write (a full disk) leaves the file as it was."""
        data = (strict_dumps(record) + "\n").encode()
        with open(self.metrics, "ab", buffering=0) as f:
            size = f.tell()
            try:
                written = 0
                while written < len(data):
                    written += f.write(data[written:])
            except OSError as e:
                with suppress(OSError):
                    f.truncate(size)
                full = ": the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
                raise MlxLocalError(
                    f"cannot write {self.metrics}{full} ({e.strerror or e}): free some space, "
                    "then run again to resume from the last checkpoint"
                ) from e

    def save_checkpoint(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        position: Position,
        adapter_config: dict[str, Any],
        keep: int,
    ) -> Path:
        """Write step-N/ atomically, then point `latest` at it, then drop all but `keep`."""
        out = self.path / f"step-{position.step}"
        with atomic_directory(out, force=True) as tmp:
            save_adapters(model, tmp, adapter_config)
            mx.save_safetensors(
                str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state))
            )
            (tmp / "state.json").write_text(strict_dumps(asdict(position), indent=2))
        write_text_atomic(self.path / "latest", out.name)
        steps = sorted(
            (int(m.group(1)), d) for d in self.path.iterdir() if (m := STEP_DIR.match(d.name))
        )
        for _, old in steps[: max(len(steps) - keep, 0)]:
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        return out

    def _truncate_metrics(self, step: int, note: Callable[[str], None]) -> None:
        """Forget metrics of steps after the checkpoint we continue from (they will rerun).

        A last line cut short by a kill or a full disk is dropped with a note; any other line
        that is not a JSON object is the user's to fix.
        """
        if not self.metrics.exists():
            return
        lines = self.metrics.read_bytes().split(b"\n")
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _metrics_record(line)
            if record is None and number >= len(lines) - 1:
                note(f"{self.metrics}: dropped a torn last line (line {number})")
            elif record is None:
                raise MlxLocalError(
                    f"{self.metrics} line {number} is not a JSON object: delete that line, then "
                    "run again"
                )
            elif record.get("step", 0) <= step:
                kept.append(strict_dumps(record) + "\n")
        write_text_atomic(self.metrics, "".join(kept))


def _metrics_record(line: bytes) -> dict[str, Any] | None:
    """One metrics line as a dict, or None where it is not one (torn or garbled)."""
    try:
        record = decode_json(line)
    except JSONProblem:
        return None
    step = record.get("step", 0) if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def read_position(ckpt: Path) -> Position:
    return Position(**read_json(ckpt / "state.json", "checkpoint state"))


def restore_checkpoint(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> Position:
    """Load trained weights, optimizer state and RNG key from `ckpt`; return its position.

    The optimizer must be initialised for the model's trainable parameters (`optimizer.init`),
    so the saved state is poured into exactly the structure the update expects.
    """
    weights = mx.load(str(ckpt / "adapters.safetensors"))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(trainable):
        raise MlxLocalError(
            f"{ckpt}: its weights do not match this model's trainable parameters; "
            "was it written by a different recipe?"
        )
    model.load_weights(list(weights.items()), strict=False)
    saved = mx.load(str(ckpt / "optimizer.safetensors"))

    def pick(path: str, current: mx.array) -> mx.array:
        if path not in saved or saved[path].shape != current.shape:
            raise MlxLocalError(f"{ckpt}: optimizer state {path} is missing or has another shape")
        return saved[path]

    optimizer.state = tree_map_with_path(pick, optimizer.state)
    position = read_position(ckpt)
    a, b = position.rng
    mx.random.seed((a << 32) | b)
    mx.eval(model.parameters(), optimizer.state)
    return position


def rng_key() -> list[int]:
    return mx.random.state[0].tolist()


def _recipe_difference(saved: Path, recipe_yaml: str) -> str | None:
    """The first key where the saved recipe and this one differ ("" for the whole), or None;
    how long they train (`training.steps`/`epochs`) may differ."""
    old = load_yaml(read_text(saved, "recipe"), str(saved), "recipes")[0]
    new = yaml.safe_load(recipe_yaml)
    for recipe in (old, new):
        if isinstance(recipe, dict) and isinstance(recipe.get("training"), dict):
            recipe["training"] = {
                k: v for k, v in recipe["training"].items() if k not in ("steps", "epochs")
            }
    return _first_difference(old, new)


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if diff is not None:
                return diff
        return None
    return None if a == b else path


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small file atomically."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace a small file atomically."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with disk_errors(path):
            tmp.write_bytes(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
