"""Optimiser construction from ``OptimConfig``."""

from __future__ import annotations

from typing import Iterable

import torch

from detlab.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (the paper's optimiser) or AdamW.

    AdamW is offered because a from-scratch depthwise-separable SSD learns the face/background
    split very slowly under SGD within a CPU budget of a few hundred steps (docs/training.md, "Optimiser").
    """
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: expected sgd or adamw")
