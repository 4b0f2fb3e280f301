"""Progress bars on a terminal; in pipes and logs, a plain line every few seconds instead.

A redrawn bar is noise in a log file (every redraw is a `\\r`), and no bar at all leaves a
long run under `nohup` or CI silent. So where stderr is not a terminal, `bar` prints one line
(`training: 120/600 step (20%), 01:30 elapsed, ~06:00 left, loss=1.234`) at most every
$MLXLOCAL_PROGRESS_SECONDS seconds (default 30; 0: at every update; `off`: never).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

from .errors import MlxLocalError

T = TypeVar("T")
SECONDS_VARIABLE = "MLXLOCAL_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    return iter(bar(desc, total, unit, items))


def bar(desc: str, total: int | None = None, unit: str = "it", items: Iterable | None = None):
    """A bar to drive by hand (`update`, `set_postfix_str`) when work does not come as a loop."""
    if not sys.stderr.isatty():
        return LineProgress(desc, total, unit, items, line_seconds())
    return tqdm(
        items,
        desc=desc,
        total=total,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
    )


def line_seconds() -> float | None:
    """$MLXLOCAL_PROGRESS_SECONDS: seconds between progress lines, or None for no lines."""
    value = os.environ.get(SECONDS_VARIABLE, "").strip()
    if not value:
        return DEFAULT_SECONDS
    if value.lower() == "off":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise MlxLocalError(
            f"{SECONDS_VARIABLE}={value!r}: give seconds between progress lines (e.g. 30), "
            "0 for a line at every step, or off"
        )
    return seconds


class LineProgress:
    """tqdm's interface (as far as mlxlocal drives it), printed as plain lines to stderr."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str,
        items: Iterable | None,
        seconds: float | None,
    ):
        self.desc, self.total, self.unit, self.items = desc, total, unit, items
        if self.total is None and hasattr(items, "__len__"):
            self.total = len(items)  # type: ignore[arg-type]
        self.seconds = seconds
        self.initial = self.n = self.last_print_n = 0
        self.postfix = ""
        self.start = self.last_print = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.items or ():
            yield item
            self.update(1)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.seconds is not None and now - self.last_print >= self.seconds:
            self.last_print, self.last_print_n = now, self.n
            print(self.line(now - self.start), file=sys.stderr, flush=True)

    def line(self, elapsed: float) -> str:
        """`desc: n/total unit (pct), elapsed, ~left, postfix`."""
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{self.desc}: {done} {self.unit}"]
        if self.total:
            parts[0] += f" ({self.n / self.total:.0%})"
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0:
            parts.append(f"~{tqdm.format_interval((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)
