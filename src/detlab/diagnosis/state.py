"""A detector's ``State`` to plain Python types and back, for checkpoints (``torch.load(weights_only=True)``
reads only plain types).

A state is a dataclass of numbers, lists, deques, ``RollingMedian`` windows and dicts of those. Saved,
deques, tuples and rolling medians become lists; loaded, each field takes the shape of a fresh state's
field (its deque's ``maxlen``, its window's size), so a resumed run whose config resized a window keeps
the most recent values. A field or a detector that the saved state lacks starts fresh: a run resumed
after a detector was added (or switched on) runs it from there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import fields
from typing import Any, Mapping

from detlab.diagnosis.windows import RollingMedian


def to_plain(value: Any) -> Any:
    """Deques, tuples and rolling medians become lists, recursively."""
    if isinstance(value, RollingMedian):
        return [float(v) for v in value.values]
    if isinstance(value, (list, tuple, deque)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value


def state_to_plain(state: Any) -> dict[str, Any]:
    """A detector's ``State`` as ``{field: plain value}``."""
    return {f.name: to_plain(getattr(state, f.name)) for f in fields(state)}


def _from_plain(fresh: Any, data: Any) -> Any:
    """``data`` (``to_plain`` output) shaped like ``fresh``, a fresh state's field; a copy, so the
    loaded state shares no list or dict with ``data``."""
    if isinstance(fresh, (bool, int, float)):
        return type(fresh)(data)
    items = to_plain(data)
    if isinstance(fresh, RollingMedian):
        return RollingMedian(fresh.size, [float(v) for v in items])
    if isinstance(fresh, deque):
        return deque(items, maxlen=fresh.maxlen)
    return items


def load_state(fresh: Any, data: Mapping[str, Any]) -> Any:
    """``fresh`` (a new ``State``) with every field ``data`` holds; the fields it lacks stay fresh."""
    for f in fields(fresh):
        if f.name in data:
            setattr(fresh, f.name, _from_plain(getattr(fresh, f.name), data[f.name]))
    return fresh
