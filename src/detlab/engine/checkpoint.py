"""Checkpoint files: written atomically, loaded with ``weights_only=True`` (never executes a pickle)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from detlab.config import Config, load_saved_config
from detlab.fileio import atomic_write_bytes


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` into a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def find_resume_checkpoint(resume: Any, run_dir: Path) -> Path | None:
    """Resolve the ``resume`` setting to a checkpoint file, or None to start fresh.

    ``false``: start fresh. ``true``: this run directory's ``checkpoints/last.pt`` when it exists
    (so re-running a sweep with a fixed ``hydra.sweep.dir`` continues every run that has one).
    A path: a checkpoint file, or a run directory holding ``checkpoints/last.pt``; it must exist.
    """
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        candidate = run_dir / "checkpoints" / "last.pt"
        return candidate if candidate.is_file() else None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume!r}: no checkpoint at {path}")
    return path


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not written by train.py; the message says which."""


def load_trained(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """``(training config, checkpoint)`` of a train.py checkpoint, on the CPU; keys of the saved config
    that have moved since are moved (``detlab.config.load_saved_config``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint={str(path)!r}: file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a checkpoint, or an unsafe pickle
        raise CheckpointError(f"checkpoint={str(path)!r}: cannot be loaded ({error})") from None
    if not (isinstance(checkpoint, dict) and {"model", "config"} <= set(checkpoint)):
        raise CheckpointError(f"checkpoint={str(path)!r}: expected a dict with 'model' and 'config' (written by train.py)")
    try:
        cfg = load_saved_config(checkpoint["config"])
    except Exception as error:  # noqa: BLE001 - any schema mismatch is reported the same way
        raise CheckpointError(f"checkpoint={str(path)!r}: its config does not match the schema: {error}") from None
    return cfg, checkpoint
