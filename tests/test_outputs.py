"""Outputs never clobber what they should not, and a kill at any instant loses nothing.

Devices, FIFOs and sockets are never replaced; existing files only with --force (eval, chat's
/save included); a run killed mid-write or between the two renames that replace a folder is
undone by the next run of the same output, and only temporaries of dead processes are removed.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxlocal.checkpoint.atomic import atomic_directory, atomic_file, recover_output
from mlxlocal.cli import cli

ROWS = [{"prompt": "The film was great.", "completion": "good"}]

# Runs `atomic_directory`/`atomic_file`, `recover_output` or the CLI in a child that SIGKILLs
# itself just before its KILL_AT-th rename or removal of OUT or its hidden siblings (0: while
# the output is being written; -1: never).
KILLER = """
import os, shutil, signal, sys
from pathlib import Path
from mlxlocal.checkpoint import atomic

kill_at, calls = int(os.environ["KILL_AT"]), [0]
out = Path(os.environ["KILL_OUT"])

def killing(real):
    def call(*args, **kwargs):
        if any(Path(a).parent == out.parent and Path(a).name.startswith(f".{out.name}.")
               or Path(a) == out for a in args):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

os.replace, shutil.rmtree = killing(os.replace), killing(shutil.rmtree)
what = sys.argv[1]
if what == "directory":
    with atomic.atomic_directory(out, force=True) as tmp:
        (tmp / "a").write_text("new")
        if kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / "b").write_text("new")
elif what == "file":
    with atomic.atomic_file(out, force=True) as tmp:
        tmp.write_text("new")
        if kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
elif what == "recover":
    atomic.recover_output(out)
else:
    from mlxlocal.cli import main
    sys.argv = ["mlxlocal", *sys.argv[2:]]
    main()
"""


def killed(out: Path, what: str, *args, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(kill_at), "KILL_OUT": str(out)}
    return subprocess.run(
        [sys.executable, "-c", KILLER, what, *map(str, args)], env=env, capture_output=True
    )


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def one_error_line(result) -> str:
    """The CLI's answer to a user's mistake: exit 1, one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def make_special(path: Path, kind: str) -> int:
    """A device, FIFO or socket at `path`; returns its file type to compare with afterwards."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    else:
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    return stat.S_IFMT(path.lstat().st_mode)


@pytest.mark.parametrize("kind", ["device", "fifo", "socket"])
def test_a_device_fifo_or_socket_is_never_replaced_even_with_force(
    kind, tiny_mlx, checkpoints, tmp_path
):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "o"
    mode = make_special(out, kind)
    runner = CliRunner()
    verbs = [
        ["eval", str(tiny_mlx), "--data", str(data), "--task", "perplexity", "--output", str(out)],
        ["convert", str(checkpoints("llama")), str(out)],
        ["recipes", "copy", "tiny-lora", str(out)],
    ]
    for args in verbs:
        error = one_error_line(runner.invoke(cli, [*args, "--force"]))
        assert "not a regular file or folder" in error
        assert stat.S_IFMT(out.lstat().st_mode) == mode
        assert siblings(out) == []
    chat = runner.invoke(cli, ["chat", str(tiny_mlx)], input=f"/save {out} --force\n")
    assert chat.exit_code == 0 and "not a regular file or folder" in chat.stderr
    assert stat.S_IFMT(out.lstat().st_mode) == mode


def test_eval_output_is_replaced_only_with_force_and_refused_before_the_model_runs(
    tiny_mlx, tmp_path
):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "results.json"
    out.write_text("mine")
    args = [
        "eval",
        str(tiny_mlx),
        "--data",
        str(data),
        "--task",
        "perplexity",
        "--output",
        str(out),
    ]
    refused = CliRunner().invoke(cli, args)
    assert "--force" in one_error_line(refused)
    assert "perplexity" not in refused.output  # refused before evaluating, not after
    assert out.read_text() == "mine"
    done = CliRunner().invoke(cli, [*args, "--force"])
    assert done.exit_code == 0, done.output
    assert json.loads(out.read_text())["metrics"]["examples"] == 1


def test_chat_save_keeps_existing_files_and_the_chat_survives_failed_saves(tiny_lm, tmp_path):
    existing, folder, a_file = tmp_path / "chat.json", tmp_path / "folder", tmp_path / "file"
    existing.write_text("mine")
    folder.mkdir()
    a_file.write_text("x")
    lines = [
        f"/save {existing}",
        f"/save {folder}",
        f"/save {a_file}/under-a-file.json",
        "/save",
        "Hello there",
        f"/save {existing} --force",
    ]
    args = ["chat", str(tiny_lm.path), "--max-tokens", "4"]
    out = CliRunner().invoke(cli, args, input="\n".join(lines) + "\n")
    assert out.exit_code == 0, out.output
    notes = out.stderr.splitlines()
    assert notes[0] == (
        f"error: {existing} already exists: `/save {existing} --force` replaces it, "
        "or choose another name"
    )
    assert notes[1] == f"error: {folder} is a folder: give a file name"
    assert notes[2] == (
        f"error: cannot write {a_file}/under-a-file.json: {a_file} cannot be made a folder "
        "(File exists)"
    )
    assert notes[3] == "usage: /save FILE [--force]"
    assert notes[4] == f"(saved to {existing})" and len(notes) == 5
    assert out.stdout.strip()  # the model answered after the failed saves
    messages = json.loads(existing.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert siblings(existing) == [] and sorted(p.name for p in folder.iterdir()) == []


def write_version(out: Path, version: str, what: str) -> None:
    if what == "file":
        out.write_text(version)
        return
    out.mkdir()
    (out / "a").write_text(version)
    (out / "b").write_text(version)


def read_version(out: Path, what: str) -> str | None:
    """The version at OUT, or None; a mixed or half-written folder fails the test."""
    if not out.exists():
        return None
    if what == "file":
        return out.read_text()
    contents = {p.name: p.read_text() for p in out.iterdir()}
    assert set(contents) == {"a", "b"} and len(set(contents.values())) == 1, contents
    return contents["a"]


# Replacing a folder: 1 OUT → .old, 2 .tmp → OUT, 3 .old → a .tmp to remove, 4 its removal.
# Replacing a file: 1 .tmp → OUT. Nothing at OUT before: 1 .tmp → OUT.
CASES = [("directory", True, k) for k in range(6)]
CASES += [("directory", False, k) for k in range(3)] + [("file", True, k) for k in range(3)]


@pytest.mark.parametrize(("what", "existed", "kill_at"), CASES)
def test_a_kill_at_any_instant_is_undone_by_the_next_run(what, existed, kill_at, tmp_path):
    out = tmp_path / "out"
    if existed:
        write_version(out, "old", what)
    child = killed(out, what, kill_at=kill_at)
    assert child.returncode in (0, -9), child.stderr
    recover_output(out)
    # The run happened whole or not at all: killed before its new output was renamed into
    # place, it is undone and the user's previous output is back; after, the new one stays.
    new_goes_in_at = 2 if what == "directory" and existed else 1
    undone = child.returncode == -9 and kill_at <= new_goes_in_at
    assert read_version(out, what) == (("old" if existed else None) if undone else "new")
    assert siblings(out) == []


@pytest.mark.parametrize("recover_kill_at", [1, 2, 3])
def test_a_kill_during_recovery_is_undone_by_the_next_one(recover_kill_at, tmp_path):
    out = tmp_path / "out"
    write_version(out, "old", "directory")
    assert killed(out, "directory", kill_at=2).returncode == -9  # between the two renames
    assert read_version(out, "directory") is None  # only hidden copies are left
    assert len(siblings(out)) == 2
    killed(out, "recover", kill_at=recover_kill_at)
    recover_output(out)
    assert read_version(out, "directory") == "old"
    assert siblings(out) == []


def dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    )
    return int(child.stdout)


def test_of_several_previous_outputs_the_last_one_moved_aside_is_put_back(tmp_path):
    out, pid = tmp_path / "out", dead_pid()
    (tmp_path / f".out.old-{pid}-ffffffff").write_text("older")
    time.sleep(0.05)  # renames update ctime: the newer rename wins, whatever the names
    (tmp_path / "staging").write_text("newer")
    os.replace(tmp_path / "staging", tmp_path / f".out.old-{pid}-00000000")
    recover_output(out)
    assert out.read_text() == "newer" and siblings(out) == []


def test_siblings_of_a_live_process_or_of_another_output_are_left_alone(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".out.old-{live.pid}-0123abcd").mkdir()
        (tmp_path / f".out.tmp-{live.pid}-0123abcd").mkdir()
        others = [f".out2.tmp-{live.pid + 10**6}-0123abcd", ".out.tmp-notes", ".out.tmp-1-xyz"]
        for name in others:
            (tmp_path / name).write_text("not ours")
        recover_output(out)
        assert not out.exists()
        assert len(siblings(out)) == 4
    finally:
        live.kill()
        live.wait()
    recover_output(out)
    assert out.is_dir()  # the old one, put back once its writer is dead
    assert siblings(out) == [".out.tmp-1-xyz", ".out.tmp-notes"]
    assert (tmp_path / others[0]).exists()


def test_this_process_keeps_the_temporaries_it_is_writing(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp, atomic_file(tmp_path / "f") as tmp_file:
        tmp_file.write_text("x")
        (tmp / "a").write_text("x")
        recover_output(out)
        recover_output(tmp_path / "f")
        assert (tmp / "a").exists() and tmp_file.exists()
    assert (out / "a").exists() and (tmp_path / "f").exists()
    assert siblings(out) == [] and siblings(tmp_path / "f") == []


def test_convert_killed_between_renames_keeps_the_previous_output(checkpoints, tmp_path):
    src, out = checkpoints("llama"), tmp_path / "out"
    assert killed(out, "cli", "convert", src, out, kill_at=-1).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Killed after OUT → .old, before the new folder → OUT: only hidden copies are left.
    child = killed(out, "cli", "convert", src, out, "--force", kill_at=2)
    assert child.returncode == -9 and not out.exists() and len(siblings(out)) == 2
    again = CliRunner().invoke(cli, ["convert", str(src), str(out)])
    assert "already exists" in one_error_line(again)  # the previous output is back: kept
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == []


@pytest.mark.parametrize("verb", ["convert", "quantize"])
def test_a_killed_runs_hidden_folder_is_removed_by_the_next_run(verb, checkpoints, tmp_path):
    src, out = checkpoints("llama"), tmp_path / "out"
    child = killed(out, "cli", verb, src, out, kill_at=1)  # written whole, not yet renamed
    assert child.returncode == -9 and not out.exists()
    assert [name.split("-")[0] for name in siblings(out)] == [".out.tmp"]
    done = CliRunner().invoke(cli, [verb, str(src), str(out)])
    assert done.exit_code == 0, done.output
    assert siblings(out) == [] and (out / "config.json").exists()
