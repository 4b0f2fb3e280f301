"""SIGKILL at any point of convert, quantize and export (issue 13): the same command run again
succeeds and writes exactly what an uninterrupted run writes, and nothing is left behind.

The child counts every filesystem step it takes (renames, removals, fsyncs, folders made, files
opened for writing) and kills itself with SIGKILL at step K. K is every rename and removal of the
output or its hidden siblings (the instants between the renames of a replaced folder) and a few
other steps drawn with a fixed seed. (`batch` and `run` resume after kills: test_batch.py,
test_resume.py; atomic files and folders on their own: test_outputs.py.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_adapter
from test_outputs import siblings

from mlxlocal.cli import cli

SEED = 13
RANDOM_POINTS = 2

KILLER = """
import builtins, io, os, shutil, signal, sys
from pathlib import Path

kill_at, log = int(os.environ["KILL_AT"]), os.environ.get("KILL_LOG")
out = Path(os.environ["KILL_OUT"])
real_open, steps = builtins.open, []

def output_path(a):
    try:
        p = Path(a)
    except TypeError:
        return False
    return p == out or p.parent == out.parent and p.name.startswith(f".{out.name}.")

def step(name, real, writes_only=False):
    def call(*args, **kwargs):
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        if not writes_only or isinstance(mode, str) and any(c in mode for c in "wax+"):
            renames = name in ("replace", "rename", "rmtree") and any(map(output_path, args))
            steps.append("output" if renames else name)
            if len(steps) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

os.replace, os.rename = step("replace", os.replace), step("rename", os.rename)
shutil.rmtree, os.fsync = step("rmtree", shutil.rmtree), step("fsync", os.fsync)
os.mkdir = step("mkdir", os.mkdir)
builtins.open = io.open = step("open", real_open, writes_only=True)
try:
    from mlxlocal.cli import main
    sys.argv = ["mlxlocal", *sys.argv[1:]]
    main()
finally:
    if log:
        with real_open(log, "w") as f:
            f.write(" ".join(steps))
"""


def run_killed(args: list, out: Path, kill_at: int, log: Path | None = None):
    env = {**os.environ, "KILL_AT": str(kill_at), "KILL_OUT": str(out)}
    if log:
        env["KILL_LOG"] = str(log)
    return subprocess.run(
        [sys.executable, "-c", KILLER, *map(str, args)], env=env, capture_output=True, text=True
    )


def contents(out: Path) -> dict[str, bytes]:
    if out.is_file():
        return {"": out.read_bytes()}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def adapter(tiny_mlx, tmp_path_factory):
    return make_adapter(tiny_mlx, tmp_path_factory.mktemp("adapter") / "a")


COMMANDS = {
    "convert": lambda src, mlx, a, out: ["convert", src, out],
    "quantize": lambda src, mlx, a, out: ["quantize", mlx, out, "--no-eval"],
    "export gguf": lambda src, mlx, a, out: ["export", "gguf", mlx, out, "--type", "q8_0"],
    "export ollama": lambda src, mlx, a, out: ["export", "ollama", mlx, out, "--adapter", a],
    "export peft": lambda src, mlx, a, out: ["export", "peft", a, out],
}


@pytest.mark.parametrize("verb", COMMANDS)
def test_a_kill_anywhere_then_the_same_command_gives_the_uninterrupted_output(
    verb, checkpoints, tiny_mlx, adapter, tmp_path
):
    def command(out: Path) -> list:
        return COMMANDS[verb](checkpoints("llama"), tiny_mlx, adapter, out)

    # The reference, and the steps an uninterrupted run takes over an existing output.
    reference = tmp_path / "reference"
    assert CliRunner().invoke(cli, [str(a) for a in command(reference)]).exit_code == 0
    expected = contents(reference)
    out = tmp_path / "out"
    done = run_killed([*command(out)], out, -1, tmp_path / "steps")
    assert done.returncode == 0, done.stderr
    first_steps = len((tmp_path / "steps").read_text().split())
    counted = run_killed([*command(out), "--force"], out, -1, tmp_path / "steps")
    assert counted.returncode == 0, counted.stderr
    steps = (tmp_path / "steps").read_text().split()
    at_output = [i + 1 for i, s in enumerate(steps) if s == "output"]
    # A folder: the previous output moved aside, the new one moved in, the old one removed;
    # a file: one rename.
    assert len(at_output) >= (1 if verb == "export gguf" else 2), steps
    rng = random.Random(f"{SEED}-{verb}")
    others = rng.sample([i + 1 for i, s in enumerate(steps) if s != "output"], RANDOM_POINTS)
    assert contents(out) == expected
    for kill_at in sorted(set(at_output + others)):
        killed = run_killed([*command(out), "--force"], out, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, steps, killed.stderr)
        again = CliRunner().invoke(cli, [str(a) for a in command(out)])
        if again.exit_code != 0:  # the killed run's output (or the previous one) is back
            assert "already exists" in again.output, (kill_at, again.output)
        assert contents(out) == expected, (kill_at, steps)
        assert siblings(out) == [], (kill_at, steps)
    # A first run (nothing at OUT) killed at a random step: the same command then succeeds.
    fresh = tmp_path / "fresh"
    kill_at = rng.randrange(1, first_steps + 1)
    assert run_killed(command(fresh), fresh, kill_at).returncode == -signal.SIGKILL
    again = CliRunner().invoke(cli, [str(a) for a in command(fresh)])
    assert again.exit_code == 0 or "already exists" in again.output, again.output
    assert contents(fresh) == expected and siblings(fresh) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out", "reference", "steps"]
