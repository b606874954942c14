"""The data side of a training run: the two datasets, their loaders (under torchrun a
``DistributedSampler`` for training, each rank's share of the validation batches for validation)
and the re-seeding at every epoch's start."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detlab.config import Config
from detlab.data import build_loader
from detlab.errors import UserError
from detlab.runtime.device import available_cores, loader_workers
from detlab.runtime.distributed import DistributedSetupError, is_initialized
from detlab.runtime.seeding import epoch_seed, seed_everything

DatasetFactory = Callable[[Config], tuple[Dataset, Dataset]]  # cfg -> (training set, validation set)

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train_set: Dataset
    val_set: Dataset
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Optional[DistributedSampler]  # torchrun only

    def start_epoch(self, seed: int, epoch: int, rank: int, skip_batches: int = 0) -> None:
        """Re-seed the global generators (augmentation) and the shuffle order for ``epoch``;
        ``skip_batches``: the epoch's pass starts after its first batches (a run resumed mid-epoch;
        the caller then puts back the generators' states of the moment it stopped)."""
        seed = epoch_seed(seed, epoch, rank)
        seed_everything(seed)
        if self.train_loader.generator is not None:
            self.train_loader.generator.manual_seed(seed)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.train_loader.batch_sampler.skip_next(skip_batches)


def build_training_data(cfg: Config, dataset_factory: DatasetFactory, world_size: int, rank: int) -> TrainingData:
    """``dataset_factory(cfg)``'s datasets and their loaders; each of ``world_size`` processes loads
    ``train.batch_size / world_size`` images per step, and validates its share of the one-process
    validation batches (``ShardBatchSampler``). ``eval.test_protocol=wider`` without WIDER's
    ground truth is an error here, before anything trains."""
    train_set, val_set = dataset_factory(cfg)
    if cfg.eval.test_protocol == "wider":  # the after-training test needs the official ground truth
        from detlab.evaluation import wider_gt_dir

        gt_dir = wider_gt_dir(cfg.dataset.root)
        if cfg.dataset.name != "widerface" or not gt_dir.is_dir():
            raise UserError(f"eval.test_protocol=wider needs WIDER FACE data with its ground truth: dataset "
                            f"{cfg.dataset.name}, no folder {gt_dir} (set eval.test_protocol=detection or null)")
    sampler = None
    if is_initialized():  # torchrun, also with one process: its order is that of any process count
        if len(train_set) < world_size:
            raise DistributedSetupError(f"{len(train_set)} training images cannot feed {world_size} processes; "
                                        f"start fewer (torchrun --nproc_per_node)")
        # Rank r takes every world_size-th image of one seeded permutation, so the ranks' batches
        # together are the global batch; set_epoch draws a new permutation per epoch.
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=cfg.train.seed, drop_last=True)
    workers, seed = loader_workers(cfg.dataset.num_workers, cfg.train.device), cfg.train.seed
    if cfg.dataset.num_workers is None:
        log.info("data-loader workers: %d (dataset.num_workers=null: chosen for %d cores)", workers, available_cores())
    train_loader = build_loader(train_set, cfg.train.batch_size // world_size, shuffle=True, num_workers=workers,
                                seed=seed, drop_last=len(train_set) > cfg.train.batch_size, sampler=sampler,
                                skippable=True)
    val_loader = build_loader(val_set, cfg.train.batch_size, shuffle=False, num_workers=workers, seed=seed,
                              shard=(rank, world_size) if is_initialized() else None)
    return TrainingData(train_set, val_set, train_loader, val_loader, sampler)
