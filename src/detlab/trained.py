"""A checkpoint written by train.py, read back: its training config, typed and validated, and its state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detlab.config import Config, load_saved_config
from detlab.runtime.checkpoint import CheckpointError, load_checkpoint


def load_trained(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """``(training config, checkpoint)`` of a train.py checkpoint, on the CPU; the saved config is typed
    and validated (``detlab.config.load_saved_config``)."""
    checkpoint = load_checkpoint(Path(path))
    if not {"model", "config"} <= set(checkpoint):
        raise CheckpointError(f"checkpoint {path}: expected a dict with 'model' and 'config' (written by train.py)")
    try:
        cfg = load_saved_config(checkpoint["config"])
    except Exception as error:  # noqa: BLE001 - any schema mismatch is reported the same way
        raise CheckpointError(f"checkpoint {path}: its config does not match the schema: {error}") from None
    return cfg, checkpoint
