"""The SSD criterion: matching, hard negative mining, and the class/box weights with their schedule.

``MultiBoxLoss`` owns everything between the head's outputs and the number the optimiser minimises
(like DETR's ``SetCriterion``): it matches the ground truth to its anchors (``match_iou``, the
``ignore_iou`` band, the box coder), mines negatives, and weighs the two terms with the weights of
the given step (``loss.adaptive_weights``: ``LossWeightSchedule``). One call::

    losses = criterion(model(images), gt_boxes, step)   # a LossTerms
    losses.total.backward()

``LossTerms`` holds the unweighted terms ``loss_cls``/``loss_box`` (each divided by the batch's
number of positives, at least 1), the weighted terms, ``total = class_weight * loss_cls +
box_weight * loss_box``, the weights used and ``num_pos``/``num_neg``. The training step,
validation and the benchmark scripts all call it this way, so train and val totals are weighted
identically. The weighted terms are separate autograd graphs over the same forward: a caller can
back-propagate each on its own (the diagnosis's gradient-norm ratio does).

Under DistributedDataParallel (``criterion(..., across_ranks=True)``, the training step) the
normaliser is the *global* batch's number of positives, summed over the ranks (as DETR's
``SetCriterion`` does with ``num_boxes``), and each rank's terms are multiplied by the world size:
DDP averages the ranks' gradients, so the update equals a single process's on the whole batch.
``LossTerms.values()`` then reports the global batch's values, the same on every rank.

- ``loss_cls``: softmax cross-entropy over the positives and the mined negatives,
- ``loss_box``: Huber (``huber_delta``) or L1 on the positives, summed over the 4 coordinates.

Mining (as torchvision's ``SSD.compute_loss``, per image): negatives are ranked by their
cross-entropy and image ``b`` keeps its ``max(neg_pos_ratio * num_pos_b, min_negatives)`` hardest
(rounded up; at most all of its negatives; ties between equal losses are broken by ``topk``).
The floor ``min_negatives`` lets images and batches without faces still learn background with a
finite, non-zero loss. ``neg_pos_ratio = 0`` keeps every negative. Positives, and anchors the
matcher put in its ignore band (label ``IGNORE``), are never ranked as negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdaptiveWeightsConfig, Config, LossConfig, RebalanceConfig
from .runtime.distributed import all_reduce_sum, get_world_size
from .model.box_coder import BoxCoder
from .model.matching import IGNORE, Assignment, match_anchors


def mine_negatives(
    cls_loss: Tensor, positive: Tensor, neg_pos_ratio: float, min_negatives: int, negative: Optional[Tensor] = None
) -> Tensor:
    """Mask ``[B, A]`` of the negatives kept by hard negative mining (see the module docstring).

    ``cls_loss [B, A]`` is the per-anchor cross-entropy (only its order matters), ``positive [B, A]``;
    ``negative [B, A]`` the background anchors that may be mined (default: every non-positive).
    """
    negative = ~positive if negative is None else negative
    if neg_pos_ratio <= 0:
        return negative
    num_pos = positive.sum(dim=1, keepdim=True)  # [B, 1]
    # Rounded up; the 1e-4 keeps float error (1.1 * 10 = 11.000000000000002) from adding one.
    num_keep = torch.clamp(neg_pos_ratio * num_pos - 1e-4, min=float(min_negatives)).ceil().long()  # [B, 1]
    num_keep = torch.minimum(num_keep, negative.sum(dim=1, keepdim=True))
    # Non-negatives (positives, ignored anchors) get -inf so they rank last. Rather than torchvision's double sort (the rank of
    # every anchor), take the top-k of each image for the batch's largest k and keep, per image,
    # the first num_keep[b] of them: same set, a fraction of the work (k << A).
    ranked = cls_loss.detach().masked_fill(~negative, -float("inf"))  # [B, A]
    k_max = int(num_keep.max()) if num_keep.numel() else 0
    keep = torch.zeros_like(positive)
    if k_max > 0:
        top_idx = ranked.topk(k_max, dim=1).indices  # [B, k_max]
        within = torch.arange(k_max, device=cls_loss.device).unsqueeze(0) < num_keep  # [B, k_max]
        keep.scatter_(1, top_idx, within)
    return keep & negative


def classification_loss(
    cls_logits: Tensor, labels: Tensor, neg_pos_ratio: float = 3.0, min_negatives: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy over positives + mined negatives (not normalised).

    Returns ``(loss_sum, num_pos, num_neg)``.
    """
    num_classes = cls_logits.shape[-1]
    # float32 even under autocast: the mining sort and log-softmax want the precision.
    # Anchors labelled IGNORE (-1, the matcher's ignore band) get no loss and are never mined.
    ce = F.cross_entropy(cls_logits.float().reshape(-1, num_classes), labels.reshape(-1), reduction="none",
                         ignore_index=IGNORE)
    ce = ce.view_as(labels)  # [B, A]
    positive = labels > 0  # [B, A]
    negative = mine_negatives(ce, positive, neg_pos_ratio, min_negatives, negative=labels == 0)  # [B, A]
    selected = positive | negative
    # torch.where rather than boolean indexing: no host sync on CUDA, and no 0 * inf = nan.
    return torch.where(selected, ce, torch.zeros_like(ce)).sum(), positive.sum(), negative.sum()


def box_regression_loss(
    bbox_regression: Tensor, box_targets: Tensor, labels: Tensor, box_loss: str = "huber", huber_delta: float = 1.0
) -> Tensor:
    """Summed Huber / L1 over the 4 coordinates of the positive anchors (not normalised)."""
    positive = (labels > 0).unsqueeze(-1)  # [B, A, 1]
    pred = bbox_regression.float()  # [B, A, 4]
    # Background targets are never read (they may hold anything, even non-finite values): they are
    # replaced by the detached prediction, so their loss and gradient are exactly zero.
    target = torch.where(positive, box_targets.float(), pred.detach())  # [B, A, 4]
    if box_loss == "huber":
        per_coord = F.huber_loss(pred, target, delta=huber_delta, reduction="none")
    elif box_loss == "l1":
        per_coord = F.l1_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"loss.box_loss={box_loss!r}: expected huber or l1")
    return torch.where(positive, per_coord, torch.zeros_like(per_coord)).sum()


class LossWeightSchedule:
    """Effective ``(class_weight, box_weight)`` per step; constant unless ``adaptive_weights.enabled``.

    Factor ``f(step)`` goes from the start factor (until ``ramp_start_fraction * total_steps``) to 1
    (from ``ramp_end_fraction * total_steps``), linearly or on a half cosine in between.
    """

    def __init__(self, cfg: AdaptiveWeightsConfig, class_weight: float, box_weight: float, total_steps: int) -> None:
        self.enabled = bool(cfg.enabled)
        self.class_weight = float(class_weight)
        self.box_weight = float(box_weight)
        self.start_class_factor = float(cfg.start_class_factor)
        self.start_box_factor = float(cfg.start_box_factor)
        self.shape = cfg.shape
        self.ramp_start = int(round(cfg.ramp_start_fraction * total_steps))
        self.ramp_end = max(self.ramp_start, int(round(cfg.ramp_end_fraction * total_steps)))

    def progress(self, step: int) -> float:
        """0 before the ramp, 1 after it."""
        if step < self.ramp_start:
            return 0.0
        if step >= self.ramp_end:
            return 1.0
        t = (step - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return 0.5 * (1.0 - math.cos(math.pi * t)) if self.shape == "cosine" else t

    def ramping(self, step: int) -> bool:
        """True while the weights still differ from the configured pair on purpose."""
        return self.enabled and step < self.ramp_end

    def weights(self, step: int) -> tuple[float, float]:
        if not self.enabled:
            return self.class_weight, self.box_weight
        p = self.progress(step)
        class_factor = self.start_class_factor + (1.0 - self.start_class_factor) * p
        box_factor = self.start_box_factor + (1.0 - self.start_box_factor) * p
        return self.class_weight * class_factor, self.box_weight * box_factor


@dataclass
class LossTerms:
    """What one criterion call returns (tensors keep their graphs; weights are the step's)."""

    loss_cls: Tensor  # unweighted
    loss_box: Tensor  # unweighted
    weighted_cls: Tensor  # class_weight * loss_cls
    weighted_box: Tensor  # box_weight * loss_box
    total: Tensor  # weighted_cls + weighted_box: what is minimised
    class_weight: float
    box_weight: float
    weights_ramping: bool  # the adaptive schedule still ramps (the imbalance is intended)
    num_pos: Tensor
    num_neg: Tensor
    num_faces: int = 0  # ground-truth boxes in the batch, degenerate ones included
    faces_covered: Optional[Tensor] = None  # of them, those an anchor fits (``match_anchors``)
    images_without_faces: int = 0
    batch_size: int = 0
    world_size: int = 1  # > 1: computed across the ranks (``across_ranks``); values() sums over them

    def values(self) -> dict[str, float]:
        """``loss_cls``, ``loss_box``, ``loss_total``, ``num_pos``, ``neg_per_pos`` (background anchors
        the classification term counts per face anchor) and the batch's label statistics
        (``face_coverage``: the share of its faces an anchor fits; ``empty_image_share``) as floats,
        with one host sync (and, across ranks, one all-reduce: the global batch's values)."""
        covered = self.faces_covered if self.faces_covered is not None else torch.zeros((), device=self.total.device)
        stacked = torch.stack([
            self.loss_cls.detach(), self.loss_box.detach(), self.total.detach(), self.num_pos.detach().float(),
            self.num_neg.detach().float(), covered.detach().float()])
        num_faces, images_without_faces, batch_size = self.num_faces, self.images_without_faces, self.batch_size
        if self.world_size > 1:
            counts = torch.tensor([num_faces, images_without_faces, batch_size], dtype=stacked.dtype,
                                  device=stacked.device)
            stacked = all_reduce_sum(torch.cat([stacked, counts]))
            stacked[:3] /= self.world_size  # each rank's terms carry the factor world_size: their mean is the batch's
            num_faces, images_without_faces, batch_size = (int(v) for v in stacked[6:].tolist())
        cls, box, total, num_pos, num_neg, num_covered = stacked[:6].tolist()
        return {"loss_cls": cls, "loss_box": box, "loss_total": total, "num_pos": num_pos,
                "neg_per_pos": num_neg / max(num_pos, 1.0),
                "face_coverage": num_covered / num_faces if num_faces else math.nan,
                "empty_image_share": images_without_faces / batch_size if batch_size else math.nan}


def multibox_terms(
    cls_logits: Tensor, bbox_regression: Tensor, labels: Tensor, box_targets: Tensor, cfg: LossConfig,
    across_ranks: bool = False, neg_pos_ratio: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unweighted ``(loss_cls, loss_box, num_pos, num_neg)`` for matched ``labels``/``box_targets``.

    ``across_ranks``: divided by the positives of all ranks' batches over the world size (see the
    module docstring), so the ranks' mean is the global batch's loss. ``neg_pos_ratio``: the mining's
    ratio when not ``cfg``'s (the mining repair's)."""
    ratio = cfg.neg_pos_ratio if neg_pos_ratio is None else neg_pos_ratio
    cls_sum, num_pos, num_neg = classification_loss(cls_logits, labels, ratio, cfg.min_negatives)
    box_sum = box_regression_loss(bbox_regression, box_targets, labels, cfg.box_loss, cfg.huber_delta)
    world_size = get_world_size() if across_ranks else 1
    if world_size > 1:
        normaliser = all_reduce_sum(num_pos.detach().float().clone()).clamp(min=1) / world_size
    else:
        normaliser = num_pos.clamp(min=1).float()
    return cls_sum / normaliser, box_sum / normaliser, num_pos, num_neg


class LossRebalancer:
    """The correction of an imbalanced weight pair (``loss.rebalance``), set once by the rebalance repair
    (``detlab.diagnosis.repairs``) when ``loss_imbalance`` fires.

    ``engage`` multiplies the box weight by ``aim / ratio`` (``ratio``: the finding's box/class
    gradient-norm ratio on the backbone's output), ``aim`` being ``target`` for a box-heavy run and
    ``class_heavy_target`` for a class-heavy one: the weights that would have given the middle of the healthy
    range at that moment, not the band's edge. The factor then stays for the rest of the run: a healthy
    run's ratio moves on its own (on the paper's recipe it rises from about 0.6 to 8 while the boxes
    learn, then falls to about 2), and steering it back to ``aim`` on every sample starved that phase
    (measured on the tune seeds: box 10 held at a ratio of 2 ended with AP50 0.25, its twin without
    the repair 0.56). The factor stays within ``[min_factor, max_factor]``.

    ``raise_lighter``: a factor below 1 divides the class weight instead of multiplying the box weight
    (the same ratio, reached by raising the lighter term). Under an Adam-type optimiser a term whose
    gradient shrinks mid-run keeps its old second-moment estimate for about 1 / (1 - beta2) steps, so its
    updates shrink by the same factor for that long; a term whose gradient grows catches up within a few
    steps.
    """

    def __init__(self, cfg: RebalanceConfig) -> None:
        self.cfg = cfg
        self.box_factor = 1.0
        self.aim: Optional[float] = None  # the gradient ratio aimed at, once engaged
        self.raise_lighter = False

    def engage(self, box_heavy: bool, ratio: float, raise_lighter: bool = False) -> float:
        """Correct the pair measured at ``ratio`` (box/class gradient norm) toward ``target`` (a box-heavy
        run) or ``class_heavy_target`` (a class-heavy one); returns the aim."""
        self.aim = self.cfg.target if box_heavy else self.cfg.class_heavy_target
        self.raise_lighter = bool(raise_lighter)
        if ratio > 0 and math.isfinite(ratio):
            self.box_factor = min(max(self.aim / ratio, self.cfg.min_factor), self.cfg.max_factor)
        return self.aim

    def factors(self) -> tuple[float, float]:
        """(class, box) weight multipliers. A box factor of 1 or more raises the box weight (the lighter
        term); one below 1 is shared in log scale between raising the class weight (all of it with
        ``raise_lighter``, else ``raise_class_share``) and lowering the box weight (the rest)."""
        if self.box_factor >= 1.0:
            return 1.0, self.box_factor
        share = 1.0 if self.raise_lighter else self.cfg.raise_class_share
        return self.box_factor ** -share, self.box_factor ** (1.0 - share)

    def state_dict(self) -> dict[str, float]:
        return {"box_factor": self.box_factor, "aim": self.aim if self.aim is not None else 0.0,
                "raise_lighter": float(self.raise_lighter)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.box_factor = float(state.get("box_factor", 1.0))
        aim = float(state.get("aim", 0.0))
        self.aim = aim if aim > 0 else None
        self.raise_lighter = bool(state.get("raise_lighter", 0.0))


class MultiBoxLoss(nn.Module):
    """SSD criterion: ``criterion(outputs, gt_boxes, step) -> LossTerms`` (see the module docstring).

    ``anchors [A, 4]`` xyxy and ``box_coder`` are the model's (``build_criterion`` takes them from it);
    ``gt_boxes`` holds one ``[G_i, 4]`` xyxy tensor per image in the model's input pixels.
    The rebalancing repair's factors (``loss.rebalance``) and the mining repair's ratio travel in its
    ``state_dict`` (checkpoints).
    """

    def __init__(self, cfg: LossConfig, anchors: Tensor, box_coder: BoxCoder, match_iou: float,
                 ignore_iou: Optional[float] = None, total_steps: int = 1) -> None:
        super().__init__()
        if cfg.box_loss not in ("huber", "l1"):
            raise ValueError(f"loss.box_loss={cfg.box_loss!r}: expected huber or l1")
        self.cfg = cfg
        self.register_buffer("anchors", anchors, persistent=False)
        self.box_coder = box_coder
        self.match_iou = float(match_iou)
        self.ignore_iou = ignore_iou
        self.schedule = LossWeightSchedule(cfg.adaptive_weights, cfg.class_weight, cfg.box_weight, total_steps)
        self.rebalancer = LossRebalancer(cfg.rebalance)
        self.neg_pos_ratio = float(cfg.neg_pos_ratio)  # the mining repair may change it (kept in the state)

    def match(self, gt_boxes: Sequence[Tensor]) -> Assignment:
        """``labels [B, A]`` (1 face, 0 background, ``IGNORE``), encoded ``box_targets [B, A, 4]`` and
        the number of faces an anchor fits."""
        return match_anchors(self.anchors, list(gt_boxes), self.box_coder, self.match_iou, self.ignore_iou)

    def weights(self, step: int) -> tuple[float, float]:
        """The class and box weights of ``step``: the schedule's, times the rebalancing factors."""
        class_weight, box_weight = self.schedule.weights(step)
        class_factor, box_factor = self.rebalancer.factors()
        return class_weight * class_factor, box_weight * box_factor

    def forward(self, outputs: Mapping[str, Tensor], gt_boxes: Sequence[Tensor], step: int,
                across_ranks: bool = False) -> LossTerms:
        """``across_ranks``: this rank's share of a DistributedDataParallel step (a collective: every
        rank must call it); validation, on rank 0 alone, leaves it off."""
        labels, box_targets, covered = self.match(gt_boxes)
        loss_cls, loss_box, num_pos, num_neg = multibox_terms(
            outputs["cls_logits"].float(), outputs["bbox_regression"].float(), labels, box_targets, self.cfg,
            across_ranks=across_ranks, neg_pos_ratio=self.neg_pos_ratio)
        class_weight, box_weight = self.weights(step)
        weighted_cls = class_weight * loss_cls
        weighted_box = box_weight * loss_box
        counts = [int(b.shape[0]) for b in gt_boxes]
        return LossTerms(loss_cls=loss_cls, loss_box=loss_box, weighted_cls=weighted_cls, weighted_box=weighted_box,
                         total=weighted_cls + weighted_box, class_weight=class_weight, box_weight=box_weight,
                         weights_ramping=self.schedule.ramping(step), num_pos=num_pos, num_neg=num_neg,
                         num_faces=sum(counts), faces_covered=covered,
                         images_without_faces=sum(n == 0 for n in counts), batch_size=len(counts),
                         world_size=get_world_size() if across_ranks else 1)

    def get_extra_state(self) -> dict[str, Any]:
        return {"rebalance": self.rebalancer.state_dict(), "neg_pos_ratio": self.neg_pos_ratio}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping):
            return
        # a checkpoint written before the mining repair holds the rebalancer's state alone
        self.rebalancer.load_state_dict(state.get("rebalance", state))
        self.neg_pos_ratio = float(state.get("neg_pos_ratio", self.neg_pos_ratio))


def build_criterion(cfg: Config, model: Any, total_steps: int = 1) -> MultiBoxLoss:
    """The criterion for ``model`` (its anchors, box coder and device) with ``cfg.loss`` and the
    matching thresholds of ``cfg.model``; ``total_steps`` scales the adaptive weight schedule."""
    return MultiBoxLoss(cfg.loss, model.anchors, model.box_coder, cfg.model.match_iou, cfg.model.ignore_iou,
                        total_steps)
