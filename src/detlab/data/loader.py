"""Factories the training loop calls: datasets from the config, batching, seeded DataLoaders."""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from detlab.config import Config, DatasetConfig
from detlab.data.cache import DecodedImageCache, default_ram_budget
from detlab.data.splits import SplitRecords, resolve_split
from detlab.data.synthetic import ensure_synthetic_dataset
from detlab.data.transforms import build_transforms
from detlab.data.wider import (
    EmptyDatasetError,
    ImageRecord,
    MissingImagesError,
    WiderFaceDataset,
    annotation_file,
    filelist_file,
    find_missing_images,
    images_dir,
    missing_layout_message,
    parse_wider_annotations,
    parse_wider_filelist,
    read_image_rgb,
)
from detlab.errors import UserError
from detlab.runtime.device import loader_workers
from detlab.runtime.distributed import shard_positions

log = logging.getLogger(__name__)


class MissingDatasetError(UserError, FileNotFoundError):
    """``dataset.root`` is not a WIDER FACE folder: absent, or without its annotations or images folder."""


def dataset_root(d: DatasetConfig) -> Path:
    """The folder in the official layout: ``d.root`` (relative to the working directory), or for
    ``synthetic`` the generated folder inside it (generated now if absent)."""
    root = Path(d.root).expanduser().resolve()
    if d.name == "synthetic":
        return ensure_synthetic_dataset(root, d.synthetic)
    if d.name != "widerface":
        raise ValueError(f"dataset.name must be 'synthetic' or 'widerface', got {d.name!r}")
    if not root.is_dir():
        raise MissingDatasetError(missing_layout_message(root, "no such folder"))
    if not (root / "wider_face_split").is_dir():
        raise MissingDatasetError(missing_layout_message(root, "no wider_face_split/ there"))
    return root


def require_images_folders(root: Path, folders: Sequence[Path]) -> None:
    """A missing images folder is one layout error, not every one of its images reported missing."""
    for folder in folders:
        if not folder.is_dir():
            shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
            raise MissingDatasetError(missing_layout_message(root, f"no {shown.as_posix()} there"))


def load_split(d: DatasetConfig) -> SplitRecords:
    """Train/val records as the config says, after checking every listed image exists.

    Raises ``EmptyDatasetError`` when no training image is left (the filters, ``max_train_images``
    or the split ratios removed them all): PyTorch's sampler would fail later with a bare
    ``num_samples=0``.
    """
    root = dataset_root(d)
    split = resolve_split(d, root)
    if not split.train:
        source = (f"split.mode=random of {d.split.source} with ratios {list(d.split.ratios)}"
                  if d.split.mode == "random" else "split.mode=official")
        raise EmptyDatasetError(
            f"no training images left in {split.train_images} after dataset.{source}, "
            f"keep_empty={d.keep_empty}, min_face_size={d.min_face_size}, drop_invalid={d.drop_invalid}, "
            f"max_train_images={d.max_train_images}; expected at least one (relax these settings)")
    if d.name == "widerface":
        require_images_folders(root, [split.train_images, split.val_images])
        if d.split.mode == "random":  # trains on part of one official split: say so, every run
            log.info("dataset=widerface: dataset.split.mode=random: a seeded %s split of the official %s images "
                     "(dataset.split.source); dataset.split.mode=official trains on WIDER_train and validates on "
                     "WIDER_val", "/".join(f"{r:g}" for r in d.split.ratios), d.split.source)
        else:
            log.info("dataset=widerface: dataset.split.mode=official: WIDER_train for training, WIDER_val for "
                     "validation")
    check_all_images_exist([(split.train, split.train_images), (split.val, split.val_images)])
    return split


def check_all_images_exist(groups: Sequence[tuple[Sequence[ImageRecord], Path]]) -> None:
    """One report (how many, the first few paths) over all groups, before any training starts."""
    missing: dict[Path, None] = {}  # ordered and de-duplicated (random splits share one folder)
    total = 0
    for records, folder in groups:
        total += len(records)
        missing.update(dict.fromkeys(find_missing_images(records, folder)))
    if missing:
        raise MissingImagesError(list(missing), total)


def build_image_cache(d: DatasetConfig) -> DecodedImageCache:
    """The decoded-image cache the config asks for (``dataset.cache``, ``cache_max_side``, ``cache_dir``)."""
    budget = d.cache_max_bytes if d.cache_max_bytes is not None else default_ram_budget(max(loader_workers(d.num_workers), 1))
    return DecodedImageCache(d.cache, d.cache_max_side, d.cache_dir, read_image_rgb, max_bytes=budget)


def build_datasets(cfg: Config) -> tuple[WiderFaceDataset, WiderFaceDataset]:
    """``(train, val)``: train augmented as ``cfg.dataset.augment`` says, val deterministic."""
    d = cfg.dataset
    split = load_split(d)
    size = (cfg.model.input_width, cfg.model.input_height)
    cache = build_image_cache(d)  # one per process, so its memory budget covers both splits
    train = WiderFaceDataset(split.train, split.train_images, build_transforms(d.augment, size, train=True),
                             size, d.on_bad_image, cache=cache, annotations=split.train_annotations)
    val = WiderFaceDataset(split.val, split.val_images, build_transforms(None, size, train=False), size,
                           d.on_bad_image, cache=cache, annotations=split.val_annotations)
    log.info("dataset %s: %d train images (%d faces), %d val images (%d faces)", d.name, len(train),
             sum(r.num_faces for r in train.records), len(val), sum(r.num_faces for r in val.records))
    return train, val


def build_predict_dataset(cfg: Config, split: str = "test") -> WiderFaceDataset:
    """A deterministic dataset over a whole official split, for prediction (e.g. the submission).

    ``test`` reads ``wider_face_test_filelist.txt`` (no boxes: every record is box-less); ``train``
    and ``val`` read their annotation files with the dataset filters.
    """
    d = cfg.dataset
    root = dataset_root(d)
    if split == "test":
        records = [ImageRecord(path=p) for p in parse_wider_filelist(filelist_file(root, "test"))]
    else:
        records = parse_wider_annotations(annotation_file(root, split), drop_invalid=d.drop_invalid,
                                          min_face_size=d.min_face_size, keep_empty=True)
    folder = images_dir(root, split)
    require_images_folders(root, [folder])
    check_all_images_exist([(records, folder)])
    size = (cfg.model.input_width, cfg.model.input_height)
    return WiderFaceDataset(records, folder, build_transforms(None, size, train=False), size, d.on_bad_image)


def collate_detection(batch: Sequence[Optional[tuple[torch.Tensor, dict[str, Any]]]],
                      input_size: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images (same input size) and keep targets as a list (a variable number of boxes each).

    ``None`` items (bad images skipped by the dataset, ``on_bad_image=skip``) are dropped. A batch
    of only such items is an *empty batch*: images ``[0, 3, H_in, W_in]`` float32 when
    ``input_size`` ``(W_in, H_in)`` is given (``build_loader`` passes the dataset's), else
    ``[0, 3, 0, 0]``, and an empty target list. Callers skip a batch with ``images.shape[0] == 0``
    (a model step on it would fail or average over nothing); ``detlab.prediction.predict_batches`` does.
    """
    items = [item for item in batch if item is not None]
    if not items:
        width, height = input_size if input_size is not None else (0, 0)
        return torch.zeros((0, 3, int(height), int(width))), []
    images = torch.stack([image for image, _ in items])  # [B, 3, H, W]
    return images, [target for _, target in items]


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch is seeded per worker from the loader's generator; follow it with
    numpy and random, and run OpenCV sequentially inside the worker (no oversubscription).

    ``setNumThreads(0)``, not 1: in a process forked after the parent used OpenCV's pthreads pool,
    ``cv2.setNumThreads(1)`` deadlocks (measured with opencv-python 5.0; 0 returns at once).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(0)


class SkippingBatchSampler(BatchSampler):
    """``BatchSampler`` whose next pass can leave out its first batches (``skip_next``) without
    loading them: a run resumed mid-epoch continues the epoch's order where it stopped. The order
    itself is the plain ``BatchSampler``'s, so every other pass is unchanged."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def skip_next(self, batches: int) -> None:
        """The next pass starts at batch ``batches`` (0-based) of its order."""
        self.skip = int(batches)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        batches = super().__iter__()
        for _ in range(skip):  # indices only: no image is read
            if next(batches, None) is None:
                return
        yield from batches


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                 drop_last: bool = False, sampler: Optional[Sampler] = None, skippable: bool = False,
                 shard: Optional[tuple[int, int]] = None) -> DataLoader:
    """A repeatable DataLoader: the shuffle order and the workers' random streams follow ``seed``.
    A ``sampler`` (torchrun's ``DistributedSampler``) chooses the order instead of ``shuffle``.
    ``skippable``: batches come from a ``SkippingBatchSampler`` (``loader.batch_sampler.skip_next``),
    built as DataLoader builds its own, so the order is the same. ``shard=(rank, world_size)`` (a
    sequential pass split over torchrun's processes: validation, the after-training test): this
    rank's batches of the one-process pass (``ShardBatchSampler``).

    With ``num_workers=0`` the augmentation draws from torch's global generator (seeded by the
    trainer's ``seed_everything``). Batches whose images were all skipped as bad are empty (see
    ``collate_detection``): the caller skips them.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    batching: dict[str, Any] = {"batch_size": batch_size, "shuffle": shuffle and sampler is None, "sampler": sampler,
                                "drop_last": drop_last}
    if shard is not None:
        if shuffle or sampler is not None or drop_last or skippable:
            raise ValueError("shard: a sequential pass of every image, without shuffle, sampler, drop_last or skips")
        batching = {"batch_sampler": ShardBatchSampler(SequentialSampler(dataset), batch_size, *shard)}
    elif skippable:  # DataLoader's own choice of sampler, then a batch sampler that can skip
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        batching = {"batch_sampler": SkippingBatchSampler(sampler, batch_size, drop_last)}
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        # A partial of a module-level function: picklable for worker processes.
        collate_fn=functools.partial(collate_detection, input_size=getattr(dataset, "input_size", None)),
        generator=generator,
        worker_init_fn=seed_worker,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class ShardBatchSampler(BatchSampler):
    """Rank ``rank``'s share of a sequential pass split over ``world_size`` processes: batch ``i`` of
    the plain ``BatchSampler``'s order (the batches one process makes, the last one partial) goes to
    the rank whose ``shard_positions`` hold ``i``. Whole batches, not images, are split: a batch is
    then exactly one process's, so its predictions and losses are the same numbers (the rounding of
    a convolution may depend on the batch size), and nothing is padded or repeated."""

    def __init__(self, sampler: Sampler, batch_size: int, rank: int, world_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.rank, self.world_size = rank, world_size

    def positions(self) -> range:
        """The positions, in the one-process pass, of this rank's batches."""
        return shard_positions(super().__len__(), self.rank, self.world_size)

    def __iter__(self):
        mine = self.positions()
        for position, batch in enumerate(super().__iter__()):  # indices only: no image is read
            if position in mine:
                yield batch

    def __len__(self) -> int:
        return len(self.positions())
