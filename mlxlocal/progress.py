"""Progress bars on a terminal, silence in pipes and logs."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    return iter(bar(desc, total, unit, items))


def bar(desc: str, total: int | None = None, unit: str = "it", items: Iterable | None = None):
    """A bar to drive by hand (`update`, `set_postfix_str`) when work does not come as a loop."""
    return tqdm(
        items,
        desc=desc,
        total=total,
        unit=unit,
        disable=not sys.stderr.isatty(),
        leave=False,
        dynamic_ncols=True,
    )
