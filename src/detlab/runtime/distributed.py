"""Multi-process training under ``torchrun`` (DistributedDataParallel): process group, ranks, reductions.

``torchrun --nproc_per_node=N train.py ...`` starts N copies of train.py with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; ``init_from_environment`` joins them into one process group
(``gloo`` on the CPU, ``nccl`` on CUDA). A plain ``python train.py`` has no such variables and runs
as before, without a process group. The helpers below are no-ops without one, so callers need no
branches of their own (DETR's ``util/misc.py`` works the same way).

What is decided here, and documented in docs/scaling_out.md:

- each rank trains on ``train.batch_size / world_size`` images per step (the global batch, the
  learning rate and the schedule are those of a single-process run);
- the training set is split by ``torch.utils.data.DistributedSampler`` seeded by ``train.seed`` and
  re-seeded every epoch (``set_epoch``), so a run resumed at an epoch boundary replays its batches;
- validation and the after-training test are split over the ranks: rank ``r`` of ``N`` predicts
  batches ``r, r + N, r + 2N, ...`` of the one-process pass (``shard_positions``: no padding, so
  no image counts twice), exactly the batches one process makes, so each batch's predictions and
  losses are the same numbers; ``gather_in_order`` brings them to rank 0 in the one-process order,
  and rank 0 scores the whole set once, with the one-process code: the metrics are identical;
- rank 0 alone writes every file; the other ranks receive its metrics, so every rank takes the
  same early-stopping, diagnosis and repair decisions.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from detlab.errors import ConfigError
from detlab.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedSetupError(UserError, RuntimeError):
    """torchrun's environment cannot run this job (more processes than GPUs or than training images).

    Config values that cannot work under torchrun (a batch that does not split, nccl without CUDA)
    are ``ConfigError``s, with the key named."""


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0, the only process that writes logs, TensorBoard, checkpoints and ``summary.json``."""
    return get_rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def choose_backend(backend: str, device_name: str) -> str:
    """``auto``: ``nccl`` when the run trains on CUDA, else ``gloo``."""
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        where = "" if torch.cuda.is_available() else " (no CUDA device here)"
        raise ConfigError(f"config error: train.dist_backend=nccl needs CUDA, but train.device={device_name}{where} "
                          f"trains on the CPU; use train.dist_backend=gloo or auto")
    return backend


def init_from_environment(backend: str, device_name: str, batch_size: int, timeout_min: float = 30.0) -> None:
    """Join torchrun's process group (when launched by it and not joined yet).

    Checks, before any collective: ``batch_size`` splits evenly over the processes. On CUDA each
    process uses the GPU of its ``LOCAL_RANK``.
    """
    if not launched_by_torchrun() or is_initialized():
        return
    world_size = int(os.environ["WORLD_SIZE"])
    if batch_size % world_size:
        raise ConfigError(
            f"config error: train.batch_size={batch_size} does not split over the {world_size} processes torchrun "
            f"started (WORLD_SIZE={world_size}): each process trains on batch_size / world_size images; choose a "
            f"multiple of {world_size}")
    name = choose_backend(backend, device_name)
    if name == "nccl":
        if local_rank() >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK={local_rank()} but this machine has {torch.cuda.device_count()} "
                                        f"CUDA device(s): start at most that many processes per node")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(name, timeout=datetime.timedelta(minutes=timeout_min))
    log.info("process group: %s, rank %d of %d (local rank %d)", name, get_rank(), get_world_size(), local_rank())


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group (a no-op without one).

    ``wait_for_others`` (a rank whose run ended normally): first wait until every rank gets here, so
    that all tear their connections down together. Rank 0 finishes later than the others (it writes
    the run's record); a gloo rank that tore down and exited meanwhile has been seen to abort at exit
    (SIGABRT, "terminate called without an active exception") after a complete run, which torchrun
    then reports as a failed job. A barrier that fails means another rank has left already: this one
    leaves too. After an exception, no barrier: a rank held in a collective that the failed rank
    never reaches would keep the others waiting for the process group's whole timeout.
    """
    if not is_initialized():
        return
    if wait_for_others:
        try:
            dist.barrier()
        except RuntimeError as error:  # DistBackendError is one: a rank that failed has gone
            log.debug("barrier before leaving the process group failed: %s", error)
    dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, device: torch.device, sync_batchnorm: bool,
               batch_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(module, DistributedDataParallel over it)``: the module (its BatchNorm layers made
    SyncBatchNorm on CUDA with ``sync_batchnorm``: the same parameter objects move into the new layers,
    so an optimiser built before keeps them) for validation and checkpoints, the wrapper for the step."""
    cuda = device.type == "cuda"
    if cuda and sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    log.info("DistributedDataParallel: %d processes, %d images per process and step (train.batch_size=%d)%s",
             get_world_size(), batch_size // get_world_size(), batch_size,
             "" if cuda and sync_batchnorm else "; BatchNorm statistics per process")
    return model, wrapped


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` has it (a picklable object); unchanged without a process group."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (a picklable object), in rank order, on every rank; ``[value]`` without
    a process group."""
    if not is_initialized():
        return [value]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_object(value: Any, dst: int = 0) -> Optional[list[Any]]:
    """Every rank's ``value`` (a picklable object), in rank order, on rank ``dst``; None on the other
    ranks; ``[value]`` without a process group."""
    if not is_initialized():
        return [value]
    gathered: Optional[list[Any]] = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(value, gathered, dst=dst)
    return gathered


def shard_positions(count: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> range:
    """The positions of ``0 .. count - 1`` that ``rank`` of ``world_size`` takes (default: this
    process's): every ``world_size``-th, from ``rank`` on. The ranks' shards are disjoint and cover
    every position once (no padding: ``DistributedSampler`` repeats items to even out the shards,
    which would count them twice); their sizes differ by one at most; a rank past ``count`` takes none."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} processes")
    return range(rank, count, world_size)


def merge_in_order(parts: Iterable[Iterable[T]], key: Callable[[T], Any]) -> list[T]:
    """The ranks' shards as one list in the original order: sorted by ``key`` (an item's position
    before the split); items of equal key keep the order of ``parts`` (rank order), then their own."""
    return sorted(itertools.chain.from_iterable(parts), key=key)


def gather_in_order(items: Sequence[T], key: Callable[[T], Any], dst: Optional[int] = 0) -> Optional[list[T]]:
    """Every rank's ``items`` (its shard of a pass, picklable) put back in the order of the unsplit
    pass (``merge_in_order`` by ``key``): on rank ``dst`` (None on the others), or with ``dst=None``
    on every rank. Without a process group: ``items`` sorted by ``key``. A collective: every rank
    calls it, an empty shard too."""
    if not is_initialized():
        return merge_in_order([items], key)
    parts = all_gather_object(list(items)) if dst is None else gather_object(list(items), dst)
    return None if parts is None else merge_in_order(parts, key)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """``module``'s buffers (BatchNorm's running statistics) as rank ``src`` has them, on every rank.
    DistributedDataParallel sends rank 0's buffers before each training forward, but that forward
    then updates each rank's own from its own images; a validation split over the ranks must see
    the statistics rank 0's checkpoint holds. No-op without a process group."""
    if not is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks (in place, also returned); unchanged without a process group."""
    if is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on any rank: a decision every rank must take together."""
    if not is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def combined_grad_norm(per_rank_norm: Optional[float], device: torch.device) -> Optional[float]:
    """The gradient norm of the global batch's loss with respect to all ranks' features, from each
    rank's norm of its own loss (which the criterion scales by ``world_size``, see
    ``MultiBoxLoss.forward``): ``sqrt(sum_r norm_r ** 2) / world_size``."""
    world = get_world_size()
    if per_rank_norm is None or world == 1:
        return per_rank_norm
    total = all_reduce_sum(torch.tensor([per_rank_norm ** 2], dtype=torch.float64, device=device))
    return float(total.sqrt().item()) / world


def combined_mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of ``values`` over all ranks' elements (each rank passes its own)."""
    flat = values.detach().double().flatten()
    count = torch.full((), float(flat.numel()), dtype=torch.float64, device=flat.device)
    total, squares, count = all_reduce_sum(torch.stack([flat.sum(), flat.square().sum(), count])).tolist()
    mean = total / count
    variance = max(squares / count - mean * mean, 0.0) * count / max(count - 1.0, 1.0)
    return mean, variance ** 0.5

