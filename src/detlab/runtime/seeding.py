"""Seeds: the run's (before anything is built) and one per epoch, so a run resumed at an epoch
boundary replays the batches and augmentations of an uninterrupted one."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (the augmentation draws from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed per (run seed, epoch, rank): a run resumed at an epoch boundary replays the same
    batches; the ranks of a distributed run augment with streams of their own."""
    entropy = [seed, epoch] + ([rank] if rank else [])  # rank 0 draws as a single-process run does
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
