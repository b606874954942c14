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


def _backbone(model: nn.Module) -> nn.Module:
    """The backbone of an SSD, also when wrapped (``DistributedDataParallel``'s ``module``)."""
    return getattr(model, "module", model).backbone


def loss_term_grad_norms(
    loss_cls_weighted: Tensor,
    loss_box_weighted: Tensor,
    shared: Iterable[Tensor],
    scale: float = 1.0,
) -> tuple[float, float]:
    """L2 norms of the gradients of the two weighted loss terms on ``shared``: tensors both terms
    depend on (the step passes the backbone's output feature maps, GradNorm's "last shared layer":
    the backward stops at the heads, a fraction of a full one; parameters work too).

    Call before the usual ``backward``: the graph is retained and ``.grad`` is left untouched. A term
    that does not depend on ``shared`` (or a zero weight) gives 0.0. Under fp16 autocast pass
    ``scale=scaler.get_scale()`` so small gradients do not underflow; the norms are unscaled again
    (an overflowing step then returns inf, which the diagnosis ignores). One host sync for both.
    """
    tensors = [t for t in shared if t.requires_grad]
    norms = [_grad_norm(loss, tensors, scale) for loss in (loss_cls_weighted, loss_box_weighted)]
    device = next((n.device for n in norms if n is not None), None)
    if device is None:
        return 0.0, 0.0
    values = torch.stack([n if n is not None else torch.zeros((), device=device) for n in norms])
    g_cls, g_box = (values / scale).tolist()
    return float(g_cls), float(g_box)


def _grad_norm(loss: Tensor, tensors: list[Tensor], scale: float) -> Optional[Tensor]:
    """The norm of ``loss``'s gradient on ``tensors`` (a tensor on their device); None when it has none."""
    if not tensors or not isinstance(loss, Tensor) or not loss.requires_grad:
        return None
    grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, tensors, retain_graph=True, allow_unused=True)
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads if g is not None]
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack(norms))


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
    weighted loss terms' gradient norms on the backbone's output (the last layer both heads share) and
    the share of the ``watched`` weights (default: all) left without gradient.

    A ``DistributedDataParallel`` model makes it one rank's share of a global step: the criterion
    normalises over all ranks, and every number in the record is the global batch's, the same on
    every rank (so every rank's diagnosis decides alike)."""
    across_ranks = isinstance(model, DistributedDataParallel)
    features: list[Tensor] = []
    hook = _backbone(model).register_forward_hook(lambda m, i, out: features.extend(out)) if sample_gradients else None
    try:
        with torch.autocast(device_type=images.device.type, enabled=amp):
            outputs = model(images)
    finally:
        if hook is not None:
            hook.remove()
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
        probe = images.detach()[:, :, ::4, ::4]
        if across_ranks:
            record.input_mean, record.input_std = combined_mean_std(probe)
        else:
            std, mean = torch.std_mean(probe.float())
            record.input_mean, record.input_std = (float(v) for v in torch.stack([mean, std]).tolist())
        # Under AMP the terms are scaled like the real backward, so fp16 gradients don't underflow.
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        grad_norm_cls, grad_norm_box = loss_term_grad_norms(losses.weighted_cls, losses.weighted_box, features,
                                                            scale=scale)
        if across_ranks:
            grad_norm_cls, grad_norm_box = (combined_grad_norm(n, images.device) for n in (grad_norm_cls, grad_norm_box))
        record.grad_norm_cls, record.grad_norm_box = grad_norm_cls, grad_norm_box

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses.total).backward()
    scaler.unscale_(optimizer)
    if sample_gradients:
        record.grad_dead_share = dead_gradient_share(model.parameters() if watched is None else watched)
    record.grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm or float("inf")))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return record
