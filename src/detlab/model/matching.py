"""Anchor/face matching for a whole batch at once.

Rules (SSD, as in torchvision's ``SSDMatcher`` and the Ultra-Light detector):

1. An anchor is a positive when its best IoU with any face of its image is ``>= iou_threshold``;
   it regresses to that face.
2. Each face's best anchor is forced positive and regresses to that face, even below the
   threshold and even when another face overlaps that anchor more (the forced anchor keeps the
   face that chose it). When several faces choose the same anchor, the one with the highest IoU
   with it keeps it (ties: the later face); the others keep only their threshold matches.
   A face that overlaps no anchor at all (IoU 0 everywhere) is not forced.
3. Faces with zero width or height cannot be matched (their encoded target would be ``-inf``).
4. Optional ignore band (``ignore_iou``, as the low threshold of torchvision's ``Matcher`` in
   RetinaNet and Faster R-CNN): an anchor whose best IoU lies in ``[ignore_iou, iou_threshold)`` and
   that is not forced is labelled ``IGNORE`` (-1): neither a face nor background, so it is never mined
   as a hard negative: the anchors one stride beside a face (nearly the same pixels) stop counting
   as its hardest "negatives". Measured in README: +4.6 easy AP on WIDER with a pretrained body,
   no gain on the default run.

The batch is handled by padding the ground truth to ``[B, N_max, 4]`` with a validity mask.
Because every image shares the same anchors, the batched IoU ``[B, N_max, A]`` needs no
hand-written broadcasting: it is torchvision's ``box_iou`` of the batch's faces (flattened)
against the anchors, scattered into the padded layout; padded rows are -1 so they never win a
max. Only the padding itself loops over the (short) Python list of images.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .box_coder import BoxCoder

IGNORE = -1  # label of anchors in the ignore band: no class loss, no box loss


def pad_boxes(gt_boxes: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """``list[Tensor[N_i, 4]] -> (boxes [B, N_max, 4], valid [B, N_max] bool)``; degenerate boxes are invalid."""
    batch = len(gt_boxes)
    n_max = max((int(b.shape[0]) for b in gt_boxes), default=0)
    padded = torch.zeros((batch, n_max, 4), dtype=torch.float32, device=device)
    valid = torch.zeros((batch, n_max), dtype=torch.bool, device=device)
    for i, boxes in enumerate(gt_boxes):
        n = int(boxes.shape[0])
        if n:
            padded[i, :n] = boxes.to(device=device, dtype=torch.float32).reshape(n, 4)
            valid[i, :n] = True
    wh = padded[..., 2:] - padded[..., :2]  # [B, N_max, 2]
    valid &= (wh > 0).all(dim=-1)
    return padded, valid


def batched_iou(padded: Tensor, valid: Tensor, anchors: Tensor) -> Tensor:
    """IoU ``[B, N_max, A]`` of padded faces against the shared anchors; invalid rows are -1.

    Only the valid rows go through ``box_iou`` (a batch with one crowded image would otherwise
    pay ``B * N_max`` rows), then they are scattered into the padded layout.
    """
    batch, n_max, _ = padded.shape
    iou = torch.full((batch, n_max, anchors.shape[0]), -1.0, dtype=torch.float32, device=padded.device)
    iou[valid] = box_iou(padded[valid], anchors)  # [T, A] -> [B, N_max, A]
    return iou


class Assignment(NamedTuple):
    """What matching a batch gives: the targets, and how many faces an anchor fits (``covered``:
    best anchor IoU at or above the threshold; degenerate boxes are never covered)."""

    labels: Tensor  # [B, A] int64: 1 face, 0 background, IGNORE
    box_targets: Tensor  # [B, A, 4] encoded deltas of the matched face (zeros on background)
    covered: Tensor  # [] int64: faces whose best anchor reaches the threshold


def assign_targets(
    anchors: Tensor,
    gt_boxes: list[Tensor],
    box_coder: BoxCoder,
    iou_threshold: float = 0.45,
    ignore_iou: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Match anchors ``[A, 4]`` to each image's faces ``gt_boxes[b] [N_b, 4]`` (xyxy, input pixels).

    Returns ``labels [B, A]`` int64 (1 face, 0 background, ``IGNORE`` in the ignore band) and ``box_targets [B, A, 4]`` (encoded
    deltas of the matched face; zeros on background anchors). ``match_anchors`` also counts the faces
    an anchor fits.
    """
    labels, box_targets, _ = match_anchors(anchors, gt_boxes, box_coder, iou_threshold, ignore_iou)
    return labels, box_targets


@torch.no_grad()
def match_anchors(
    anchors: Tensor,
    gt_boxes: list[Tensor],
    box_coder: BoxCoder,
    iou_threshold: float = 0.45,
    ignore_iou: Optional[float] = None,
) -> Assignment:
    """``assign_targets`` with the number of faces whose best anchor IoU reaches ``iou_threshold``:
    the diagnosis's ``unmatched_faces`` reads it (anchors that do not fit the faces, or boxes in
    another format, leave most faces with only a forced, poorly overlapping anchor)."""
    device = anchors.device
    batch, num_anchors = len(gt_boxes), anchors.shape[0]
    padded, valid = pad_boxes(gt_boxes, device)  # [B, N, 4], [B, N]
    labels = torch.zeros((batch, num_anchors), dtype=torch.int64, device=device)
    box_targets = torch.zeros((batch, num_anchors, 4), dtype=torch.float32, device=device)
    if padded.shape[1] == 0 or batch == 0:
        return Assignment(labels, box_targets, torch.zeros((), dtype=torch.int64, device=device))
    n_max = padded.shape[1]

    iou = batched_iou(padded, valid, anchors.float())  # [B, N, A]
    best_gt_iou, best_gt_idx = iou.max(dim=1)  # per anchor: [B, A], [B, A]
    best_anchor_iou, best_anchor_idx = iou.max(dim=2)  # per face: [B, N], [B, N]

    # Forced matches. Several faces may pick the same anchor: the highest IoU wins, then the
    # highest face index; scatter_reduce("amax") makes that deterministic on CPU and CUDA.
    chooses = valid & (best_anchor_iou > 0)  # [B, N]
    choice_iou = best_anchor_iou.masked_fill(~chooses, -1.0)  # [B, N]
    forced_iou = torch.full((batch, num_anchors), -1.0, device=device)
    forced_iou.scatter_reduce_(1, best_anchor_idx, choice_iou, reduce="amax")  # [B, A]
    wins = chooses & (choice_iou == forced_iou.gather(1, best_anchor_idx))  # [B, N]
    face_index = torch.arange(n_max, device=device).expand(batch, n_max)  # [B, N]
    forced_gt = torch.full((batch, num_anchors), -1, dtype=torch.int64, device=device)
    forced_gt.scatter_reduce_(1, best_anchor_idx, torch.where(wins, face_index, -1), reduce="amax")  # [B, A]
    forced = forced_gt >= 0  # [B, A]

    matched_gt = torch.where(forced, forced_gt, best_gt_idx)  # [B, A]
    positive = forced | (best_gt_iou >= iou_threshold)  # [B, A]
    labels[positive] = 1
    if ignore_iou is not None and ignore_iou < iou_threshold:
        labels[~positive & (best_gt_iou >= ignore_iou)] = IGNORE

    matched_boxes = padded.gather(1, matched_gt.unsqueeze(-1).expand(-1, -1, 4))  # [B, A, 4]
    # Background anchors are encoded against themselves (zeros) so no log(0) ever appears.
    anchors_b = anchors.float().unsqueeze(0).expand(batch, -1, -1)  # [B, A, 4]
    matched_boxes = torch.where(positive.unsqueeze(-1), matched_boxes, anchors_b)
    box_targets = box_coder.encode(matched_boxes, anchors_b)  # [B, A, 4]
    covered = (valid & (best_anchor_iou >= iou_threshold)).sum()
    return Assignment(labels, box_targets, covered)
