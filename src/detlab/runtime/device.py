"""Device choice shared by train.py, evaluate.py and the scripts (``auto`` | ``cpu`` | ``cuda``)."""

from __future__ import annotations

import torch

from detlab.runtime.distributed import is_initialized, local_rank
from detlab.errors import UserError


class DeviceUnavailableError(UserError, RuntimeError):
    """``cuda`` was asked for on a machine without a CUDA device."""


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a CUDA device is an error.
    Under torchrun a process on CUDA takes the device of its ``LOCAL_RANK``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device=cuda but no CUDA device is available (use device=auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if is_initialized():  # a torchrun process: the GPU of its LOCAL_RANK
        return torch.device("cuda", local_rank())
    return torch.device("cuda")
