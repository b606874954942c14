"""Atomic run-directory writes and checkpoint files that load with ``weights_only=True``."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from detlab.fileio import atomic_binary_writer, atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rewrite the whole CSV (header + rows) atomically; missing values stay empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


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
