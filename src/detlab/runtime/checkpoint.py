"""Checkpoint files: written atomically, loaded with ``weights_only=True`` (never executes a pickle)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from detlab.errors import UserError
from detlab.runtime.fileio import atomic_write_bytes


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable or not written by train.py; the message says which."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` into a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint``; ``CheckpointError`` naming the file when it is
    missing, truncated, not a checkpoint or not loadable with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a checkpoint, or an unsafe pickle
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"checkpoint {path}: cannot be loaded; it is truncated (an interrupted copy?), "
                              f"not a checkpoint, or holds objects other than tensors ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict written by train.py, got {type(checkpoint).__name__}")
    return checkpoint


def load_weights(model: torch.nn.Module, state_dict: dict[str, Any], source: str | Path) -> None:
    """``model.load_state_dict(state_dict)``, or one ``CheckpointError`` line saying how the weights
    and the model built from the config differ (the first mismatches), instead of torch's list."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensor(s) of another shape, e.g. {k}: weights {list(state_dict[k].shape)}, "
                         f"model {list(expected[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        cfg = getattr(model, "cfg", None)
        built = (f" ({cfg.name}, {cfg.input_width}x{cfg.input_height}, width_mult {cfg.width_mult})"
                 if cfg is not None else "")
        raise CheckpointError(f"{source}: the weights do not fit the model its config describes{built}: "
                              f"{'; '.join(parts)}. Was the config (model.*) edited, or the weights taken from "
                              f"another run?")
    model.load_state_dict(state_dict)


def all_finite(state_dict: dict[str, Any]) -> bool:
    """True when every floating-point tensor of ``state_dict`` is finite (one host sync)."""
    checks = [torch.isfinite(t).all() for t in state_dict.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


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
        raise CheckpointError(f"resume={resume!r}: no checkpoint at {path}")
    return path
