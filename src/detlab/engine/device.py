"""Device choice shared by train.py, evaluate.py and the scripts (``auto`` | ``cpu`` | ``cuda``)."""

from __future__ import annotations

import torch

from detlab.errors import UserError


class DeviceUnavailableError(UserError, RuntimeError):
    """``cuda`` was asked for on a machine without a CUDA device."""


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device=cuda but no CUDA device is available (use device=auto)")
    return torch.device(name)
