"""Decoded-image cache: each image is decoded once, downscaled to at most ``max_side`` pixels, kept as uint8.

Why: on real WIDER FACE (JPEGs of about 1024x700) decoding is the largest single cost of a training
step on a CPU (``python scripts/bench_loader.py`` prints it). Later epochs only crop and resize.

- ``none``: decode every time (what the dataset did before the cache existed).
- ``ram``: a dict in the process. With ``dataset.num_workers > 0`` each worker fills its own copy.
- ``disk``: one ``.npy`` per image under ``folder``, named by a hash of the image's path, size, mtime,
  ``max_side`` and ``ENTRY_VERSION`` (an edited image, or another ``max_side``, is a new entry); written
  atomically, so a killed run never leaves a half-written entry. Survives runs and is shared by sweep jobs.

Bad images: the ``decode`` callable (``detlab.data.wider.read_image_rgb``) raises ``BadImageError``
for a missing, undecodable or truncated file; nothing is cached then, so every later ``get`` raises
again and the dataset's ``on_bad_image`` decides (error, or skip and count).

``max_side`` (``dataset.cache_max_side``) bounds memory: a 1024x683 image at ``max_side=640`` is
640x427 (0.8 MB). Images no larger than it are kept at their own size. The dataset scales the boxes
by the same factors and still reports the original size, so metrics stay in original pixels.

``max_bytes`` (``dataset.cache_max_bytes``) bounds the ``ram`` cache of one process: once the entries
kept reach it, further images are decoded on every read (as with ``none``) and the process says so
once. Null: ``default_ram_budget()``, a quarter of the machine's memory shared by the processes that
each hold a copy (the data-loader workers). All of WIDER FACE train decoded at full size is about
30 GB, more than many machines have: without a bound the OOM killer ends the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from detlab.runtime.fileio import atomic_binary_writer

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "ram", "disk")
# Share of the machine's memory the ram caches of one run may hold together (the training loop, the
# model and the optimiser need the rest; two runs of a sweep side by side still fit).
RAM_SHARE = 0.25
# Part of the disk entries' names. 2: the decoder rejects truncated JPEG/PNG files, which version 1
# decoded half (OpenCV fills the rest with grey); such stale entries must not be served again.
ENTRY_VERSION = 2

Decoder = Callable[[Path], np.ndarray]


def machine_memory_bytes() -> int:
    """Physical memory of this machine (0 where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def default_ram_budget(processes: int = 1) -> Optional[int]:
    """``RAM_SHARE`` of the machine's memory, divided among ``processes`` that each hold a ram cache
    (the data-loader workers); None (no bound) where the machine's memory is unknown."""
    total = machine_memory_bytes()
    return int(total * RAM_SHARE / max(processes, 1)) if total else None


def downscale_to_max_side(rgb: np.ndarray, max_side: Optional[int]) -> np.ndarray:
    """``rgb`` shrunk (area interpolation) so its longer side is at most ``max_side``; never enlarged."""
    height, width = rgb.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return rgb
    factor = max_side / max(height, width)
    size = (max(int(round(width * factor)), 1), max(int(round(height * factor)), 1))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


class DecodedImageCache:
    """``get(path) -> (rgb [h, w, 3] uint8, (orig_height, orig_width))``; see the module docstring."""

    def __init__(self, mode: str, max_side: Optional[int], folder: Optional[os.PathLike | str], decode: Decoder,
                 max_bytes: Optional[int] = None) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"dataset.cache={mode!r}: expected one of {', '.join(CACHE_MODES)}")
        if max_side is not None and max_side < 1:
            raise ValueError(f"dataset.cache_max_side={max_side!r}: must be >= 1 or null")
        if mode == "disk" and folder is None:
            raise ValueError("dataset.cache=disk needs dataset.cache_dir")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"dataset.cache_max_bytes={max_bytes!r}: must be >= 0 or null")
        self.mode = mode
        self.max_side = max_side if mode != "none" else None
        self.folder = Path(folder).expanduser().resolve() if (mode == "disk" and folder is not None) else None
        self.decode = decode
        self._ram: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        self.max_bytes = max_bytes
        self.bytes_kept = 0
        self.full = False  # the ram budget was reached: later images are decoded on every read

    def get(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        if self.mode == "none":
            rgb = self.decode(path)
            return rgb, (int(rgb.shape[0]), int(rgb.shape[1]))
        key = str(path)
        if self.mode == "ram":
            hit = self._ram.get(key)
            if hit is None:
                hit = self._load(path)
                self._keep(key, hit)
            return hit
        return self._from_disk(path)

    def _keep(self, key: str, entry: tuple[np.ndarray, tuple[int, int]]) -> None:
        size = entry[0].nbytes
        if self.max_bytes is not None and self.bytes_kept + size > self.max_bytes:
            if not self.full:
                self.full = True
                log.warning("dataset.cache=ram: the memory budget (dataset.cache_max_bytes=%d, %.1f GB) is full "
                            "after %d images; the others are decoded on every read (dataset.cache=disk keeps them "
                            "on disk, dataset.cache_max_side shrinks them, or raise the budget)",
                            self.max_bytes, self.max_bytes / 1e9, len(self._ram))
            return
        self._ram[key] = entry
        self.bytes_kept += size

    def _load(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        rgb = self.decode(path)  # raises BadImageError for an unreadable file: nothing is cached
        original = (int(rgb.shape[0]), int(rgb.shape[1]))
        return np.ascontiguousarray(downscale_to_max_side(rgb, self.max_side)), original

    def _entry(self, path: Path) -> Path:
        stat = os.stat(path)
        ident = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.max_side}|v{ENTRY_VERSION}"
        digest = hashlib.sha1(ident.encode()).hexdigest()
        assert self.folder is not None
        return self.folder / digest[:2] / f"{digest}.npz"

    def _from_disk(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            entry = self._entry(path)
        except FileNotFoundError:
            return self._load(path)  # the decoder raises its own clear error for a missing file
        if entry.exists():
            try:
                with np.load(entry) as data:
                    return data["rgb"], (int(data["orig"][0]), int(data["orig"][1]))
            except (OSError, ValueError, KeyError, EOFError):
                pass  # unreadable entry (another tool truncated it): decode again and rewrite it
        rgb, original = self._load(path)
        # Concurrent sweep jobs or a killed run never expose half an entry; a lost entry is only a re-decode.
        with atomic_binary_writer(entry, fsync=False) as handle:
            np.savez(handle, rgb=rgb, orig=np.array(original, dtype=np.int64))
        return rgb, original
