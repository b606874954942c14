"""Weighted multibox loss with per-image hard negative mining.

``MultiBoxLoss(cfg.loss)(cls_logits, bbox_regression, labels, box_targets)`` returns

- ``loss_cls``: softmax cross-entropy over the positives and the mined negatives,
- ``loss_box``: Huber (``huber_delta``) or L1 on the positives, summed over the 4 coordinates,
- ``loss_total = class_weight * loss_cls + box_weight * loss_box``,
- ``num_pos``, ``num_neg`` (negatives kept by mining), as tensors,

``loss_cls`` and ``loss_box`` are unweighted and both divided by the number of positives in the
batch (at least 1). They are separate autograd graphs over the same forward, so a caller can
back-propagate each term on its own (``torch.autograd.grad(out["loss_box"], params,
retain_graph=True)``); ``classification_loss`` and ``box_regression_loss`` are the per-term
functions.

Mining (as torchvision's ``SSD.compute_loss``, per image): negatives are ranked by their
cross-entropy and image ``b`` keeps its ``max(neg_pos_ratio * num_pos_b, min_negatives)`` hardest
(rounded up; at most all of its negatives; ties between equal losses are broken by ``topk``).
The floor ``min_negatives`` lets images and batches without faces still learn background with a
finite, non-zero loss. ``neg_pos_ratio = 0`` keeps every negative. Positives, and anchors the
matcher put in its ignore band (label ``IGNORE``), are never ranked as negatives.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LossConfig
from .model.matching import IGNORE


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


class MultiBoxLoss(nn.Module):
    """SSD multibox loss: ``loss_total = class_weight * loss_cls + box_weight * loss_box``."""

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        if self.cfg.box_loss not in ("huber", "l1"):
            raise ValueError(f"loss.box_loss={self.cfg.box_loss!r}: expected huber or l1")

    def forward(
        self, cls_logits: Tensor, bbox_regression: Tensor, labels: Tensor, box_targets: Tensor
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        cls_sum, num_pos, num_neg = classification_loss(cls_logits, labels, cfg.neg_pos_ratio, cfg.min_negatives)
        box_sum = box_regression_loss(bbox_regression, box_targets, labels, cfg.box_loss, cfg.huber_delta)
        normaliser = num_pos.clamp(min=1).float()
        loss_cls = cls_sum / normaliser
        loss_box = box_sum / normaliser
        return {
            "loss_cls": loss_cls,
            "loss_box": loss_box,
            "loss_total": cfg.class_weight * loss_cls + cfg.box_weight * loss_box,
            "num_pos": num_pos,
            "num_neg": num_neg,
        }
