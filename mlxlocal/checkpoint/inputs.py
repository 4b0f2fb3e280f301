"""Reading files we did not write — configs, headers, recipes, rules, data — as hostile input.

Every way such a file can fail becomes one `MlxLocalError` line instead of a traceback, a hang
or gigabytes of memory:
- only regular files are read: `/dev/zero` never ends and a FIFO blocks until a writer comes;
- JSON: invalid UTF-8, syntax errors, integers past Python's digit limit (a ValueError) and
  nesting past the recursion limit (a RecursionError) are all "not valid JSON";
- YAML: anchors and aliases are refused while composing, before anything is built, so a
  597-byte "billion laughs" stays 597 bytes and a self-referencing alias cannot recurse.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

from ..errors import MlxLocalError

_TOO_LONG = f"a number of more than {sys.get_int_max_str_digits()} digits"
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(path: str | Path, what: str) -> Path:
    """`path` when it names a regular file (links followed); anything else is refused unread."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MlxLocalError(f"{path}: no such {what}") from None
    except OSError as e:
        raise MlxLocalError(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise MlxLocalError(f"{path}: is {kind}, not a file; give the {what} as a regular file")
    return path


def read_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of a regular file, with one-line errors."""
    path = regular_file(path, what)
    try:
        return path.read_bytes()
    except OSError as e:
        raise MlxLocalError(f"{path}: cannot read the {what} ({e.strerror or e})") from e


def read_text(path: str | Path, what: str) -> str:
    """A regular file as UTF-8 text, with one-line errors."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxLocalError(f"{path}: the {what} is not UTF-8 text ({e.reason})") from e


# --- JSON ---------------------------------------------------------------------------------------


class JSONProblem(ValueError):
    """Why a text is not usable JSON, in a few words (the caller adds where)."""


def decode_json(text: str | bytes) -> Any:
    """`json.loads`, every failure a `JSONProblem`."""
    try:
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise JSONProblem(f"not UTF-8 text ({e.reason})") from e
    except json.JSONDecodeError as e:
        line = f"line {e.lineno} " if e.lineno > 1 else ""
        raise JSONProblem(f"not valid JSON ({e.msg} at {line}column {e.colno})") from e
    except RecursionError as e:
        raise JSONProblem("not valid JSON (nested too deeply)") from e
    except ValueError as e:  # an integer past Python's digit limit
        raise JSONProblem(f"not valid JSON ({_TOO_LONG})") from e


def parse_json(text: str | bytes, where: str, fix: str = "fix or re-download it") -> Any:
    """JSON from `where` (a file name, or a file and what part of it), as one-line errors."""
    try:
        return decode_json(text)
    except JSONProblem as e:
        raise MlxLocalError(f"{where}: {e}; {fix}") from e


def read_json(path: str | Path, what: str, fix: str = "fix or re-download it") -> dict[str, Any]:
    """A JSON file whose top level must be an object (a config, an index), as one-line errors."""
    data = parse_json(read_bytes(path, what), f"{path}", fix)
    if not isinstance(data, dict):
        got = type(data).__name__
        raise MlxLocalError(f"{path}: the {what} must be a JSON object, not {got}; {fix}")
    return data


# --- YAML ---------------------------------------------------------------------------------------


class AliasRefused(yaml.MarkedYAMLError):
    """An anchor or alias met while composing."""


class SafeYAML(yaml.SafeLoader):
    """PyYAML's safe loader without anchors or aliases.

    Aliases share a node, so a few bytes can name a tree of billions of nodes (or a node that
    contains itself); everything that walks the document — building, line indexing,
    validation — would pay for it. Refused at the first `&`/`*`, before any of that runs.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise AliasRefused(problem="alias or anchor", problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(
    text: str, where: str, what: str, loader: type[SafeYAML] = SafeYAML, lines: bool = True
) -> tuple[Any, yaml.Node | None]:
    """(data, node) of one YAML document; `what` names the kind of text for the alias error.

    `lines` adds `:LINE` to `where` in errors (a file, not a one-line override).
    """
    reader = loader(text)

    def at(mark: yaml.Mark | None) -> str:
        return f"{where}:{mark.line + 1}" if lines and mark else where

    try:
        node = reader.get_single_node()
        data = reader.construct_document(node) if node is not None else None
    except AliasRefused as e:
        raise MlxLocalError(
            f"{at(e.problem_mark)}: YAML aliases/anchors are not allowed in {what}; "
            "write the value out"
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise MlxLocalError(f"{at(mark)}: not valid YAML ({e.problem}); fix the syntax") from e
    except yaml.YAMLError as e:
        raise MlxLocalError(f"{where}: not valid YAML ({e}); fix the syntax") from e
    except RecursionError:
        raise MlxLocalError(f"{where}: not valid YAML (nested too deeply); fix it") from None
    except ValueError as e:  # an integer past Python's digit limit
        raise MlxLocalError(f"{where}: not valid YAML ({_TOO_LONG}); fix the value") from e
    finally:
        reader.dispose()
    return data, node
