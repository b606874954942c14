"""Lenient number reading for values that come from JSON, YAML or a CSV cell: unknown is None."""

from __future__ import annotations

import math
from typing import Any, Optional


def as_float(value: Any) -> Optional[float]:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def as_int(value: Any) -> Optional[int]:
    number = as_float(value)
    return int(number) if number is not None and math.isfinite(number) else None
