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


def strict_dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN or Infinity: non-finite floats become null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
