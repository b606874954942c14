"""Device choice shared by train.py, evaluate.py and the scripts (``auto`` | ``cpu`` | ``cuda``), and the
data-loader workers that suit the machine."""

from __future__ import annotations

import os
from typing import Optional

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


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as a SLURM or container limit sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: Optional[int], device_name: str = "auto", cores: Optional[int] = None) -> int:
    """``dataset.num_workers``: the number given, or for null a value that suits the machine.

    The cores are shared by the processes of one node (torchrun's ``LOCAL_WORLD_SIZE``). Up to 2 cores a
    process gets no worker: its torch threads already use both cores and the default step's data work
    (augmentation; decoding is cached) is about 15% of the step, so a worker only takes cores from the
    network (measured on 2 cores, docs/measured.md). Training on CUDA, the CPU does nothing but feed the
    GPU: all the process's cores but one, at most 8 (the rule of torchvision's references and Ultralytics).
    Training on a larger CPU, a quarter of the cores, at most 4, overlap the data with the network
    (not measured here: no such machine)."""
    if requested is not None:
        return requested
    per_process = (cores or available_cores()) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if per_process <= 2:
        return 0
    on_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    return min(8, per_process - 1) if on_cuda else min(4, per_process // 4)
