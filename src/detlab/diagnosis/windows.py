"""Rolling windows and small statistics on Python floats, the detectors' working memory.

Everything here is O(1) amortised per step (deques, a bisect-sorted median window) and holds plain
floats: the detectors never keep tensors, and their state serialises to plain types (``state``).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any, Iterable, Mapping


class RollingMedian:
    """Median of the last ``size`` values: a deque for order, a sorted list (bisect) for the median."""

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self._sorted: list[float] = []
        for value in values:
            self.push(value)

    def __len__(self) -> int:
        return len(self.values)

    def push(self, value: float) -> None:
        if len(self.values) == self.size:
            old = self.values.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self.values.append(value)
        bisect.insort(self._sorted, value)

    def median(self) -> float:
        n = len(self._sorted)
        if n == 0:
            return math.nan
        mid = n // 2
        return self._sorted[mid] if n % 2 else 0.5 * (self._sorted[mid - 1] + self._sorted[mid])


def is_finite_loss(value: Any) -> bool:
    """True for a finite number (a one-element tensor converts); False for nan, inf, None or anything
    that is not one number."""
    if value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, RuntimeError):
        return False


def mean(values: Iterable[float]) -> float:
    """Exact (``math.fsum``) mean; nan when empty."""
    values = list(values)
    return math.fsum(values) / len(values) if values else math.nan


def relative_drop(start: float, now: float) -> float:
    """(start - now) / |start|; positive when the value fell, nan when ``start`` is 0."""
    return (start - now) / abs(start) if start != 0 else math.nan


def strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def push_loss(value: Any, first: list[float], recent: deque[float]) -> None:
    """Keep the first ``recent.maxlen`` finite values of training and the most recent ones."""
    if is_finite_loss(value):
        if len(first) < recent.maxlen:
            first.append(float(value))
        recent.append(float(value))


def pick(signals: Mapping[str, Any], keys: Iterable[str]) -> dict[str, float]:
    """The ``keys`` of ``signals`` as floats, nan where absent (an epoch's record in a history)."""
    return {key: float(signals.get(key, math.nan)) for key in keys}
