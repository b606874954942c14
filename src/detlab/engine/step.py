"""One optimisation step as a function: forward, criterion, backward, clip, update, schedule.

``train_step`` returns a ``StepRecord`` of plain floats, so a step can be unit-tested and timed on
its own; the training loop, ``scripts/profile_step.py``, ``scripts/bench_precision.py`` and
``scripts/bench_train_overhead.py`` all call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from detlab.config import Config, ModelConfig
from detlab.runtime.distributed import combined_grad_norm, combined_mean_std
from detlab.engine.optim import build_optimizer
from detlab.schedule import build_scheduler
from detlab.loss import MultiBoxLoss, build_criterion
from detlab.model import SSD, build_model


@dataclass
class TrainingParts:
    """What a step needs besides the batch: ``build_training`` makes them from a config."""

    model: nn.Module
    criterion: MultiBoxLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: bool  # autocast: float16 with the scaler on CUDA, bfloat16 on the CPU
    # The weights whose gradients the dead-gradient share counts (None: all; ``watched_parameters``).
    watched: Optional[list[nn.Parameter]] = None

    def step(self, images: Tensor, gt_boxes: Sequence[Tensor], step: int, grad_clip_norm: Optional[float] = None,
             sample_gradients: bool = False) -> "StepRecord":
        return train_step(self.model, self.criterion, self.optimizer, self.scheduler, self.scaler, images, gt_boxes,
                          step, amp=self.amp, grad_clip_norm=grad_clip_norm, sample_gradients=sample_gradients,
                          watched=self.watched)


def watched_parameters(model: nn.Module, cfg: ModelConfig) -> list[nn.Parameter]:
    """The weights a dead-gradient share counts: all of them, except those frozen (``requires_grad=False``)
    on a model whose backbone loaded pretrained weights (``model.backbone_weights``), which is how a
    fine-tuning recipe freezes on purpose. Freezing randomly initialised weights is no recipe: those count,
    so a backbone frozen by mistake is still named."""
    pretrained = str(cfg.backbone_weights).lower() not in ("none", "")
    return [p for p in model.parameters() if p.requires_grad or not pretrained]


def build_training(cfg: Config, device: torch.device, total_steps: int, steps_per_epoch: int,
                   model_factory: Callable[[ModelConfig], SSD] = build_model) -> TrainingParts:
    """Model (``model_factory(cfg.model)``, on ``device``), criterion, optimiser, learning-rate schedule
    and gradient scaler, in that order (the model's initialisation draws from the global RNG)."""
    cuda = device.type == "cuda"
    amp = bool(cfg.train.amp) if cuda else bool(cfg.train.cpu_bf16)
    model = model_factory(cfg.model).to(device)
    criterion = build_criterion(cfg, model, total_steps)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and cuda)
    return TrainingParts(model, criterion, optimizer, scheduler, scaler, amp, watched_parameters(model, cfg.model))


@dataclass
class StepRecord:
    """What one step measured. ``updated`` is False when the loss was not finite: no update was made."""

    loss_cls: float  # unweighted
    loss_box: float  # unweighted
    loss_total: float  # weighted, as minimised
    class_weight: float
    box_weight: float
    weights_ramping: bool
    lr: float  # the step's learning rate (before the scheduler advanced)
    num_pos: float
    face_coverage: float = math.nan  # share of the batch's faces an anchor fits
    empty_image_share: float = math.nan  # share of the batch's images without a face
    grad_norm: float = math.nan  # total gradient norm before clipping
    grad_norm_cls: Optional[float] = None  # the weighted terms' gradient norms on the backbone's output,
    grad_norm_box: Optional[float] = None  # on the steps that sample them
    grad_dead_share: Optional[float] = None  # share of the weights (by count) the update left without gradient
    neg_per_pos: float = math.nan  # background anchors the classification term counts per face anchor
    input_mean: Optional[float] = None  # the network input's mean and standard deviation, on sampled steps
    input_std: Optional[float] = None
    updated: bool = True

    def signals(self) -> dict[str, float]:
        """The diagnosis's per-step signals (see ``Detector.check_step``)."""
        out = {"loss_cls": self.loss_cls, "loss_box": self.loss_box, "loss_total": self.loss_total,
               "lr": self.lr, "num_pos": self.num_pos, "weights_ramping": float(self.weights_ramping),
               "face_coverage": self.face_coverage, "empty_image_share": self.empty_image_share,
               "neg_per_pos": self.neg_per_pos}
        if self.grad_norm_cls is not None and self.grad_norm_box is not None:
            out.update(grad_norm_cls=self.grad_norm_cls, grad_norm_box=self.grad_norm_box)
        if self.grad_dead_share is not None:
            out["grad_dead_share"] = self.grad_dead_share
        if self.input_mean is not None and self.input_std is not None:
            out.update(input_mean=self.input_mean, input_std=self.input_std)
        if self.updated:
            out["grad_norm"] = self.grad_norm
        return out


class TermGradientProbe:
    """The L2 norms of the two weighted loss terms' gradients on the backbone's feature maps (GradNorm's
    "last shared layer"), with one partial backward instead of two: the smaller term's gradient on the maps
    by a backward through the heads alone (``before_backward``), the other's as the gradient the step's
    own backward leaves on the maps minus the first. Measured on the default config (2 threads), the two
    partial backwards took 70-80 ms against a 250 ms step.

    The maps are the backbone's outputs, where a coarser map can be computed from a finer one, so a term's
    gradient on a map is its whole derivative there (a gradient hook on each head's input would see only
    that head's share). The term taken by difference carries an error of one rounding of each map's
    gradient (under bfloat16 about 0.4% of the total), which is why it is the larger one: the smaller
    weighted loss value picks the term measured directly.

    Construct before the forward with the backbone; ``stop_watching`` after it; ``before_backward`` with
    the two weighted terms; ``norms`` after the backward. A term without gradient on the maps gives 0.0.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self._features: list[Tensor] = []
        self._handle: Optional[torch.utils.hooks.RemovableHandle] = backbone.register_forward_hook(
            lambda module, args, out: self._features.extend(out))
        self._direct: list[Optional[Tensor]] = []
        self._direct_is_box = False
        self._total: dict[int, Tensor] = {}

    def stop_watching(self) -> None:
        """Later forwards go unwatched."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def before_backward(self, weighted_cls: Tensor, weighted_box: Tensor, scale: float = 1.0) -> None:
        """The smaller term's gradient on the maps (``scale``: the factor the step's backward multiplies the
        loss by, the gradient scaler's under float16, so float16 gradients don't underflow); then hooks
        that keep the step's own backward's gradient on each map."""
        maps = [f for f in self._features if f.requires_grad]
        self._features = maps
        self._direct_is_box = abs(float(weighted_box.detach())) < abs(float(weighted_cls.detach()))
        direct = weighted_box if self._direct_is_box else weighted_cls
        if maps and isinstance(direct, Tensor) and direct.requires_grad:
            self._direct = list(torch.autograd.grad(direct * scale if scale != 1.0 else direct, maps,
                                                    retain_graph=True, allow_unused=True))
        else:
            self._direct = [None] * len(maps)
        for index, feature in enumerate(maps):
            feature.register_hook(lambda grad, index=index: self._total.__setitem__(index, grad.detach()))

    def norms(self, scale: float = 1.0) -> tuple[float, float]:
        """(class, box) after the step's backward, unscaled. One host sync for both."""
        squares_direct, squares_other = [], []
        for index, direct in enumerate(self._direct):
            total = self._total.get(index)
            if direct is not None:
                squares_direct.append(torch.linalg.vector_norm(direct.float()).square())
            if total is not None:
                other = total.float() - direct.float() if direct is not None else total.float()
                squares_other.append(torch.linalg.vector_norm(other).square())
        if not squares_direct and not squares_other:
            return 0.0, 0.0
        device = (squares_direct or squares_other)[0].device
        sums = [torch.stack(s).sum() if s else torch.zeros((), device=device) for s in (squares_direct, squares_other)]
        g_direct, g_other = (torch.stack(sums).sqrt() / scale).tolist()
        return (float(g_other), float(g_direct)) if self._direct_is_box else (float(g_direct), float(g_other))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The SSD itself, also when wrapped (``DistributedDataParallel``'s ``module``)."""
    return getattr(model, "module", model)


def dead_gradient_share(parameters: Iterable[nn.Parameter]) -> float:
    """Share of the weights (by element count) whose gradient is absent or all zero (one host sync):
    frozen layers, or layers the loss no longer reaches."""
    params = list(parameters)
    if not params:
        return math.nan
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    device = params[0].device
    alive = torch.stack([p.grad.detach().abs().amax() > 0 if p.grad is not None and p.grad.numel()
                         else torch.zeros((), dtype=torch.bool, device=device) for p in params]).cpu()
    return float(1.0 - (sizes * alive).sum() / sizes.sum())


def train_step(
    model: nn.Module,
    criterion: MultiBoxLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    images: Tensor,
    gt_boxes: Sequence[Tensor],
    step: int,
    amp: bool = False,
    grad_clip_norm: Optional[float] = None,
    sample_gradients: bool = False,
    watched: Optional[Iterable[nn.Parameter]] = None,
) -> StepRecord:
    """One step on a batch already on the model's device. ``sample_gradients`` also measures the two
    weighted loss terms' gradient norms on the backbone's output (the last layer both heads share; in the
    step's own backward, ``TermGradientProbe``), the input's mean and spread, and the share of the
    ``watched`` weights (default: all) left without gradient.

    A ``DistributedDataParallel`` model makes it one rank's share of a global step: the criterion
    normalises over all ranks, and every number in the record is the global batch's, the same on
    every rank (so every rank's diagnosis decides alike)."""
    across_ranks = isinstance(model, DistributedDataParallel)
    probe = TermGradientProbe(_unwrapped(model).backbone) if sample_gradients else None
    try:
        with torch.autocast(device_type=images.device.type, enabled=amp):
            outputs = model(images)
    finally:
        if probe is not None:
            probe.stop_watching()
    losses = criterion(outputs, gt_boxes, step, across_ranks=across_ranks)
    values = losses.values()
    record = StepRecord(**values, class_weight=losses.class_weight, box_weight=losses.box_weight,
                        weights_ramping=losses.weights_ramping, lr=optimizer.param_groups[0]["lr"])
    if not math.isfinite(values["loss_total"]):
        record.updated = False  # the caller ends the run before a bad update
        return record
    if sample_gradients:
        # every 4th pixel each way: the input's mean and spread from 1/16 of it, at 1/16 of the cost
        # (the whole batch took 18 ms of a 270 ms step on 2 cores; the check's bounds are decades wide)
        pixels = images.detach()[:, :, ::4, ::4]
        if across_ranks:
            record.input_mean, record.input_std = combined_mean_std(pixels)
        else:
            std, mean = torch.std_mean(pixels.float())
            record.input_mean, record.input_std = (float(v) for v in torch.stack([mean, std]).tolist())

    optimizer.zero_grad(set_to_none=True)
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0  # the backward's, before update() changes it
    if probe is not None:
        probe.before_backward(losses.weighted_cls, losses.weighted_box, scale)
    scaler.scale(losses.total).backward()
    if probe is not None:
        grad_norm_cls, grad_norm_box = probe.norms(scale)
        if across_ranks:
            grad_norm_cls, grad_norm_box = (combined_grad_norm(n, images.device) for n in (grad_norm_cls, grad_norm_box))
        record.grad_norm_cls, record.grad_norm_box = grad_norm_cls, grad_norm_box
    scaler.unscale_(optimizer)
    if sample_gradients:
        record.grad_dead_share = dead_gradient_share(model.parameters() if watched is None else watched)
    record.grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm or float("inf")))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return record
