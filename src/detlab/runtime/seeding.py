"""Seeds: the run's (before anything is built) and one per epoch, so a run resumed at an epoch
boundary replays the batches and augmentations of an uninterrupted one; and the generators' states,
which a checkpoint written mid-epoch holds, so a run resumed there replays them too."""

from __future__ import annotations

import random
from typing import Any

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


def rng_state() -> dict[str, Any]:
    """The global generators' states (Python's, NumPy's, torch's, CUDA's when in use), as tensors and
    plain types (a checkpoint loads them with ``weights_only=True``): what a run interrupted mid-epoch
    saves, so that its resumed session draws the same augmentations."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators' states that ``rng_state`` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
