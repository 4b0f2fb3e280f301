"""JSON every reader accepts: Python's `json.dumps` writes NaN and Infinity, which JSON has not.

The policy, for every file and line we write: a float that is not finite (a diverged loss, an
undefined score) is written as `null` — a missing value to JSON readers (pandas reads NaN), and
to our own resume, which compares and reads what it wrote back.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every NaN or ±Infinity (in any nested dict, list or tuple) made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def non_finite_at(value: Any, path: str) -> str | None:
    """Where in `value` (named `path`) a NaN or ±Infinity sits, as `path.key[2]`; else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        children = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((w for p, v in children if (w := non_finite_at(v, p)) is not None), None)


def strict_dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN or Infinity: non-finite floats become null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
