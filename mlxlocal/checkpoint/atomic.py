"""Outputs appear whole or not at all: write into a hidden sibling, rename into place.

Siblings of OUT are named `.OUT.tmp-PID-XXXXXXXX` (being written) and `.OUT.old-PID-XXXXXXXX`
(the previous OUT, moved aside for the instant between the two renames that replace a folder).
The PID names the owner: once it is dead, the next run of the same OUT puts back an `.old` whose
OUT is missing and removes every other sibling, so a kill at any instant loses neither the
previous output nor disk space. Siblings of a live process are never touched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MlxLocalError

# Siblings this process is writing now (its own PID alone does not say a sibling is in use).
_IN_USE: set[str] = set()


def check_output(out: str | Path, force: bool) -> None:
    """Before any work: recover OUT from a killed run, then refuse what must not be replaced.

    A device, FIFO or socket is never replaced; an existing file or folder only with `force`.
    """
    out = Path(out)
    recover_output(out)
    _refuse(out, force)


def recover_output(out: str | Path) -> None:
    """Undo what dead writers left of OUT: restore the previous OUT, remove their temporaries."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    try:
        found = [(m, p) for p in out.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except (FileNotFoundError, NotADirectoryError):
        return
    dead = [(m.group(1), p) for m, p in found if _abandoned(p, int(m.group(2)))]
    olds = sorted((p for kind, p in dead if kind == "old"), key=_renamed_at)
    if olds and not os.path.lexists(out):
        # Killed between its two renames: the newest one moved aside is the user's last output.
        try:
            os.replace(olds.pop(), out)
        except FileNotFoundError:  # another process restored it first
            pass
    for path in olds:
        _discard_old(path, out)
    for kind, path in dead:
        if kind == "tmp":
            _remove(path)


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on failure it vanishes."""
    out = Path(out)
    check_output(out, force)
    make_parent(out)
    with _sibling_in_use(out, "tmp") as tmp:
        with disk_errors(out):
            tmp.mkdir()
            yield tmp
        _refuse(out, force)
        if not os.path.lexists(out):
            os.replace(tmp, out)
            return
        # A folder cannot be renamed over a folder: move OUT aside, then the new one in.
        with _sibling_in_use(out, "old") as old:
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _discard_old(old, out)


@contextmanager
def atomic_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path for a single-file output; rename it into place on success."""
    out = Path(out)
    if out.is_dir():
        raise MlxLocalError(f"{out} is a folder: give a file name")
    check_output(out, force)
    make_parent(out)
    with _sibling_in_use(out, "tmp") as tmp:
        with disk_errors(out):
            yield tmp
        _refuse(out, force)
        os.replace(tmp, out)


@contextmanager
def disk_errors(out: Path) -> Iterator[None]:
    """A write under `out` that fails for want of space is one line naming `out`.

    Python says ENOSPC (or EDQUOT); MLX's writers (`mx.save_safetensors`, `mx.save`) say only
    "[write] Unable to write N bytes to file", and numpy's `tofile` (the gguf package's tensor
    writer) "N requested and M written", which on a file we just created mean the same.
    """
    try:
        yield
    except DiskFull as e:  # a write nested inside this output (a file in its folder)
        raise _disk_full(out, e.detail) from e
    except OSError as e:
        if e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(e)):
            raise _disk_full(out, str(e)) from e
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(out, e.strerror) from e
    except RuntimeError as e:
        if not str(e).startswith("[write] "):
            raise
        raise _disk_full(out, str(e).removeprefix("[write] ").rstrip(".")) from e


class DiskFull(MlxLocalError):
    """An output that did not fit; `detail` is what the writer said."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _disk_full(out: Path, detail: str) -> DiskFull:
    try:
        free = f", {shutil.disk_usage(out.parent).free / 2**20:.1f} MB free there"
    except OSError:
        free = ""
    return DiskFull(
        f"cannot write {out}: the disk is full ({detail}{free}); free some space, then run "
        "again — nothing was written",
        detail,
    )


def make_parent(out: Path) -> None:
    """The folder `out` goes in, made if missing; one line when a file stands in its way."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxLocalError(
            f"cannot write {out}: {e.filename} cannot be made a folder ({e.strerror})"
        ) from e


def _refuse(out: Path, force: bool) -> None:
    try:
        mode = out.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise MlxLocalError(
            f"{out} exists and is not a regular file or folder (a device, FIFO or socket): "
            "choose another output path"
        )
    if not force:
        raise MlxLocalError(f"{out} already exists: choose another OUT or pass --force to replace")


@contextmanager
def _sibling_in_use(out: Path, kind: str) -> Iterator[Path]:
    """A fresh sibling name, marked in use while the block runs and removed if left behind."""
    path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _IN_USE.add(_key(path))
    try:
        yield path
    finally:
        if kind == "tmp":
            _remove(path)
        _IN_USE.discard(_key(path))


def _discard_old(old: Path, out: Path) -> None:
    """Remove a superseded `.old`: renamed to a `.tmp` first, so a half-removed one is never
    mistaken for a whole previous output."""
    with _sibling_in_use(out, "tmp") as trash:
        try:
            os.replace(old, trash)
        except FileNotFoundError:  # another process removed it first
            pass


def _abandoned(path: Path, pid: int) -> bool:
    """Whether no process is writing `path`: its owner is dead, or is us and done with it."""
    if pid == os.getpid():
        return _key(path) not in _IN_USE
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive under another user, or no PID at all
        return False
    return False


def _renamed_at(path: Path) -> tuple[int, str]:
    """A rename updates ctime; the name breaks ties so the choice is deterministic."""
    try:
        return path.lstat().st_ctime_ns, path.name
    except FileNotFoundError:
        return 0, path.name


def _key(path: Path) -> str:
    return os.path.join(os.path.realpath(path.parent), path.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
