"""Measuring child processes and describing the machine, shared by every suite."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS of one child process (from the kernel, via wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return Run(wall, usage.ru_maxrss / 1024)


def alternate(pairs: dict[str, callable], reps: int) -> dict[str, list[Run]]:
    """Run each contender once per repetition, A/B/A/B, so drift hits both alike."""
    runs: dict[str, list[Run]] = {name: [] for name in pairs}
    for _ in range(reps):
        for name, fn in pairs.items():
            runs[name].append(fn())
    return runs


def alternate_commands(
    commands: dict[str, list[str]], outs: dict[str, Path], reps: int
) -> dict[str, list[Run]]:
    """`alternate` for commands that write `outs[name]`: each run starts without its output."""

    def contender(name: str):
        def once() -> Run:
            shutil.rmtree(outs[name], ignore_errors=True)
            return measure(commands[name], env={"HF_HUB_OFFLINE": "1"})

        return once

    return alternate({name: contender(name) for name in commands}, reps)


def mlx_lm_convert(src: Path, out: Path, *flags: str) -> list[str]:
    """The `mlx_lm convert` command line, the peer of our convert and quantize."""
    command = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src)]
    return [*command, "--mlx-path", str(out), *flags]


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; macOS: sysctl), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.decode().strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import mlx.core as mx

    from mlxlocal.blas import active_blas

    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "mlx_backend": "metal"
        if mx.metal.is_available()
        else ("cuda" if mx.cuda.is_available() else "cpu"),
        "blas": active_blas(),  # children inherit it (MLXLOCAL_BLAS=mkl re-executes us)
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "mlxlocal": version("mlxlocal"),
    }
