"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def find_widerface() -> Path | None:
    """``$DETLAB_WIDERFACE``, else ``../shared/widerface`` beside the repository; None if absent."""
    root = Path(os.environ.get("DETLAB_WIDERFACE") or Path(__file__).resolve().parents[2] / "shared" / "widerface")
    return root if root.is_dir() else None


@pytest.fixture
def widerface_root() -> Path:
    """The real WIDER FACE folder (official layout); skips the test when it is absent."""
    root = find_widerface()
    if root is None:
        pytest.skip("WIDER FACE not found (../shared/widerface or $DETLAB_WIDERFACE)")
    return root
