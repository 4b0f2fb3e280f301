"""`mlxlocal run RECIPE --nproc N | --hosts FILE`: the same run on N ranks through `mlx.launch`.

`mlx.launch` exits 0 even when its ranks fail, so this wrapper reads the warnings it prints
about each rank and the `error: rank R: ...` line each failing rank prints (cli.py), and turns
the first failure into one `MlxLocalError`. The ranks are this interpreter running `mlxlocal
run` with the same arguments: on other machines the same Python path must hold mlxlocal.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.inputs import JSONProblem, decode_json, read_text
from ..errors import MlxLocalError

BACKENDS = ("ring", "mpi", "jaccl", "nccl")
LOCAL = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXITED = re.compile(r"\[WARN\] Node with rank (\d+) exited with code (-?\d+)")
KILLED = re.compile(r"\[WARN\] Node with rank (\d+) was killed")
RANK_ERROR = re.compile(r"^error: rank (\d+): (.*)$")
# The rank's own process (this interpreter running the CLI), as tests/helpers.CLI does.
RANK_COMMAND = [
    sys.executable,
    "-c",
    "import sys; from mlxlocal.cli import main; sys.argv[0] = 'mlxlocal'; main()",
]


def read_hostfile(path: str | Path) -> list[dict]:
    """The hosts of an `mlx.launch` hostfile, checked: a JSON list of {"ssh": name, "ips": [...]}.

    Names other than this machine's must resolve, so a typo fails here rather than as a
    silent ssh exit inside the launcher.
    """
    text = read_text(Path(path), "hostfile")
    try:
        hosts = decode_json(text.encode())
    except JSONProblem as e:
        raise MlxLocalError(f"hostfile {path}: not JSON ({e}); see `mlx.launch --help`") from e
    entry = '{"ssh": "host", "ips": ["10.0.0.1"]}'
    if not isinstance(hosts, list) or not hosts:
        raise MlxLocalError(f"hostfile {path}: expected a JSON list of {entry}, one per machine")
    for i, host in enumerate(hosts):
        ips = host.get("ips", []) if isinstance(host, dict) else None
        if (
            not isinstance(host, dict)
            or not isinstance(host.get("ssh"), str)
            or not host["ssh"]
            or not isinstance(ips, list)
            or not all(isinstance(ip, str) for ip in ips)
        ):
            raise MlxLocalError(f"hostfile {path}: entry {i + 1} is not of the form {entry}")
        name = host["ssh"].rpartition("@")[2]
        if name not in LOCAL:
            try:
                socket.getaddrinfo(name, 22)
            except OSError as e:
                raise MlxLocalError(
                    f"hostfile {path}: host {name!r} (entry {i + 1}) cannot be reached ({e}); "
                    "fix the name or check `ssh " + name + "` works without a password"
                ) from e
    return hosts


def launch_command(
    args: list[str], nproc: int | None, hostfile: Path | None, backend: str = "ring"
) -> list[str]:
    """The `mlx.launch` line that runs `mlxlocal ARGS` on every rank."""
    here = Path(sys.executable).parent / "mlx.launch"
    launcher = str(here) if here.exists() else shutil.which("mlx.launch")
    if launcher is None:
        raise MlxLocalError("mlx.launch is not installed: pip install mlx (0.30 or newer)")
    where = ["--hostfile", str(hostfile)] if hostfile is not None else ["-n", str(nproc)]
    return [launcher, "--backend", backend, *where, "--", *RANK_COMMAND, *args]


@dataclass
class Outcome:
    """What the launcher's output said about the ranks."""

    exited: dict[int, int] = field(default_factory=dict)  # rank → non-zero exit code
    killed: list[int] = field(default_factory=list)  # stopped by the launcher after another
    errors: dict[int, str] = field(default_factory=dict)  # rank → its first error line

    def read(self, line: str) -> None:
        line = ANSI.sub("", line).strip()
        if m := EXITED.search(line):
            self.exited.setdefault(int(m.group(1)), int(m.group(2)))
        elif m := KILLED.search(line):
            self.killed.append(int(m.group(1)))
        elif m := RANK_ERROR.match(line):
            self.errors.setdefault(int(m.group(1)), m.group(2))

    def failure(self, returncode: int) -> str | None:
        """The one line saying which rank failed and why, or None when all finished.

        A rank's own error line wins; then a rank killed by a signal (the others then fail
        on the broken ring); then the first rank that exited non-zero."""
        for rank in self.exited:
            if rank in self.errors:
                return f"rank {rank}: {self.errors[rank]}"
        if self.errors:
            rank, text = next(iter(self.errors.items()))
            return f"rank {rank}: {text}"
        if self.exited:
            signalled = [r for r, code in self.exited.items() if code < 0]
            rank = signalled[0] if signalled else next(iter(self.exited))
            code = self.exited[rank]
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            if code == 255:
                how += " (could ssh reach its host?)"
            return (
                f"rank {rank} {how}; run the same command again to resume from the last checkpoint"
            )
        if self.killed or returncode != 0:
            return f"mlx.launch failed (exit code {returncode}); see its messages above"
        return None


def launch(
    args: list[str], nproc: int | None, hostfile: Path | None, backend: str = "ring"
) -> None:
    """Run `mlxlocal ARGS` on every rank; raise the first failing rank's error."""
    if (nproc is None) == (hostfile is None):
        raise MlxLocalError("give one of --nproc N or --hosts FILE")
    if backend not in BACKENDS:
        raise MlxLocalError(f"distributed back end {backend!r}: choose one of {BACKENDS}")
    if hostfile is not None:
        read_hostfile(hostfile)
    command = launch_command(args, nproc, hostfile, backend)
    outcome = Outcome()
    # stdin a pipe never written: the launcher forwards stdin, and /dev/null would spin it.
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            outcome.read(line)
            if not RANK_ERROR.match(ANSI.sub("", line).strip()):
                sys.stderr.write(line)  # progress and notes; errors are summed up below
                sys.stderr.flush()
        returncode = proc.wait()
    failure = outcome.failure(returncode)
    if failure is not None:
        raise MlxLocalError(failure)
