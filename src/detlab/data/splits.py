"""Train/val records: the official annotation files, or a seeded ratio split of one of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import numpy as np

from detlab.config import DatasetConfig
from detlab.data.wider import (
    ImageRecord,
    MissingAnnotationError,
    annotation_file,
    images_dir,
    parse_wider_annotations,
)

T = TypeVar("T")


def split_records(records: Sequence[T], ratios: Sequence[float], seed: int) -> list[list[T]]:
    """Shuffle with ``seed`` and cut into ``len(ratios)`` consecutive parts of those shares.

    Shares may sum to less than 1 (the rest is unused). Parts keep the shuffled order, so the first
    N of a part is itself a seeded random subset. The same seed and records give the same parts.
    """
    if any(r < 0 for r in ratios) or not 0 < sum(ratios) <= 1 + 1e-9:
        raise ValueError(f"ratios must be non-negative shares summing to at most 1, got {list(ratios)}")
    order = np.random.default_rng(seed).permutation(len(records))
    bounds = np.rint(np.cumsum([0.0, *ratios]) * len(records)).astype(int).clip(0, len(records))
    return [[records[j] for j in order[bounds[k]:bounds[k + 1]]] for k in range(len(ratios))]


def first_n(records: list[T], n: Optional[int], seed: int, shuffle: bool) -> list[T]:
    """The first ``n`` records (after a seeded shuffle when ``shuffle``); all when ``n`` is None."""
    if n is None or n >= len(records):
        return records
    if shuffle:
        records = [records[j] for j in np.random.default_rng(seed).permutation(len(records))]
    return records[: max(n, 0)]


@dataclass
class SplitRecords:
    train: list[ImageRecord]
    train_images: Path
    val: list[ImageRecord]
    val_images: Path
    test: Optional[list[ImageRecord]] = None  # the held-out third share of a random split
    train_annotations: Optional[Path] = None  # the annotation files the records were parsed from
    val_annotations: Optional[Path] = None


def _parse(root: Path, split: str, d: DatasetConfig, hint: str = "") -> list[ImageRecord]:
    path = annotation_file(root, split)
    if not path.is_file():
        raise MissingAnnotationError(path, hint=f" (dataset.root={d.root!r}){hint}")
    return parse_wider_annotations(path, drop_invalid=d.drop_invalid, min_face_size=d.min_face_size,
                                   keep_empty=d.keep_empty)


def resolve_split(d: DatasetConfig, root: Path) -> SplitRecords:
    """Records and image folders for train and val as ``d.split`` says; ``max_*_images`` applied.

    The subsets are the first N after a seeded shuffle (``split.seed``): in random mode the split's
    own shuffle, in official mode a shuffle of the file order (which is grouped by event).
    """
    s = d.split
    if s.mode == "official":
        hint = (" -- with only one annotation file at hand use dataset.split.mode=random "
                "dataset.split.source=val")
        train, val = _parse(root, "train", d, hint), _parse(root, "val", d, hint)
        out = SplitRecords(train, images_dir(root, "train"), val, images_dir(root, "val"),
                           train_annotations=annotation_file(root, "train"), val_annotations=annotation_file(root, "val"))
        shuffle = True
    elif s.mode == "random":
        parts = split_records(_parse(root, s.source, d), list(s.ratios), s.seed)
        folder = images_dir(root, s.source)
        source = annotation_file(root, s.source)
        out = SplitRecords(parts[0], folder, parts[1], folder, parts[2] if len(parts) > 2 else None,
                           train_annotations=source, val_annotations=source)
        shuffle = False
    else:
        raise ValueError(f"dataset.split.mode must be 'official' or 'random', got {s.mode!r}")
    out.train = first_n(out.train, d.max_train_images, s.seed, shuffle)
    out.val = first_n(out.val, d.max_val_images, s.seed, shuffle)
    return out
