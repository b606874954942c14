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
   as its hardest "negatives". Measured in docs/real_wider.md: +4.6 easy AP on WIDER with a pretrained body,
   no gain on the default run.

The batch is handled by padding the ground truth to ``[B, N_max, 4]`` with a validity mask.
Because every image shares the same anchors, the batched IoU ``[B, N_max, A]`` needs no
hand-written broadcasting: it is torchvision's ``box_iou`` of the batch's faces (flattened)
against the anchors, scattered into the padded layout; padded rows are -1 so they never win a
max. Only the padding itself loops over the (short) Python list of images.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
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


class AnchorGrid(NamedTuple):
    """Anchors of one shape whose centres are every pair of ``xs`` x ``ys``."""

    width: float
    height: float
    xs: np.ndarray  # [X] sorted
    ys: np.ndarray  # [Y] sorted


def anchor_grids(anchors: Tensor) -> tuple[list[AnchorGrid], Tensor]:
    """The anchors ``[A, 4]`` as grids of one shape each (both generators in ``detlab.model.anchors``
    lay every size of a level on a grid of centres), and the anchors that are on none (``[R, 4]``)."""
    boxes = anchors.detach().double().cpu().numpy().reshape(-1, 4)
    wh = boxes[:, 2:] - boxes[:, :2]
    centres = np.round((boxes[:, :2] + boxes[:, 2:]) / 2, 3)
    shapes, shape_of = np.unique(np.round(wh, 3), axis=0, return_inverse=True)
    shape_of = shape_of.reshape(-1)
    grids, rest = [], []
    for k in range(len(shapes)):
        members = shape_of == k
        c = centres[members]
        xs, ys = np.unique(c[:, 0]), np.unique(c[:, 1])
        if len(xs) * len(ys) == len(c) and len(np.unique(c, axis=0)) == len(c):
            grids.append(AnchorGrid(float(wh[members][0, 0]), float(wh[members][0, 1]), xs, ys))
        else:
            rest.append(members)
    left = np.any(rest, axis=0) if rest else np.zeros(len(boxes), dtype=bool)
    return grids, anchors.detach().float().cpu()[torch.from_numpy(left)]


def _nearest(values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The element of sorted ``values`` nearest to each query."""
    right = np.searchsorted(values, queries).clip(max=len(values) - 1)
    left = (right - 1).clip(min=0)
    return np.where(np.abs(queries - values[left]) <= np.abs(values[right] - queries), values[left], values[right])


def best_anchor_iou(faces: Tensor, anchors: Tensor, chunk: int = 2048) -> Tensor:
    """``[F]``: each ``xyxy`` face's best IoU with any anchor ``[A, 4]``: the number ``match_anchors``
    compares with the threshold to count the faces an anchor fits, for a whole dataset's faces.

    On a grid of equal anchors the overlap with a face shrinks as the anchor's centre moves away from
    the face's in x or in y, so its best anchor is the one whose centre is nearest in each axis: one
    IoU per face and anchor shape (``anchor_grids``; NumPy, a few milliseconds for 10,000 faces), not
    per anchor. Anchors on no grid go through ``torchvision.ops.box_iou``, ``chunk`` faces at a time."""
    faces = faces.detach().float().cpu().reshape(-1, 4)
    best = np.zeros(faces.shape[0])
    if faces.shape[0] == 0 or anchors.shape[0] == 0:
        return torch.from_numpy(best).float()
    grids, rest = anchor_grids(anchors)
    fx1, fy1, fx2, fy2 = faces.double().numpy().T
    cx, cy = (fx1 + fx2) / 2, (fy1 + fy2) / 2
    area = np.clip(fx2 - fx1, 0, None) * np.clip(fy2 - fy1, 0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        for grid in grids:
            ax, ay = _nearest(grid.xs, cx), _nearest(grid.ys, cy)
            iw = np.clip(np.minimum(fx2, ax + grid.width / 2) - np.maximum(fx1, ax - grid.width / 2), 0, None)
            ih = np.clip(np.minimum(fy2, ay + grid.height / 2) - np.maximum(fy1, ay - grid.height / 2), 0, None)
            inter = iw * ih
            best = np.fmax(best, inter / (area + grid.width * grid.height - inter))
    out = torch.from_numpy(np.nan_to_num(best, nan=0.0)).float()
    if len(rest):
        out = torch.maximum(out, torch.cat([box_iou(part, rest).amax(dim=1) for part in faces.split(chunk)]))
    return out


def smallest_matchable_face(anchors: Tensor, iou_threshold: float, image_size: tuple[int, int],
                            step: float = 0.5, grid: int = 32) -> tuple[float, float]:
    """Sides (pixels, on multiples of ``step``) of the smallest square face an anchor fits at
    ``iou_threshold``: centred at the best of the ``grid x grid`` whole-pixel positions of a block at
    the image's centre (32 pixels by default: a whole cell of strides up to 32, its worst offsets
    included), and centred at every one of them (``inf`` when no side up to four times the smallest
    anchor's is). ``image_size`` is ``(W, H)``.

    A square face of side ``f`` centred on a square anchor of side ``s > f`` has IoU ``(f / s)**2``, so
    the first number is about ``s_min * sqrt(iou_threshold)``; the second adds the worst offset from
    the anchors' centres."""
    anchors = anchors.float().cpu()
    sides = torch.minimum(anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1])
    largest = 4.0 * float(sides.min())
    # 400 sizes spaced by a constant ratio (1.1% for 10-pixel anchors), on multiples of ``step``: every
    # multiple up to about 45 pixels, a 2% grid for anchors of hundreds of pixels.
    sizes = torch.unique(torch.round(torch.logspace(math.log10(step), math.log10(max(largest, step)), 400) / step) * step)
    width, height = image_size
    offsets = torch.arange(grid, dtype=torch.float32) - grid // 2
    cy, cx = torch.meshgrid(height // 2 + offsets, width // 2 + offsets, indexing="ij")
    centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # [P, 2]
    reach = float(offsets.abs().max()) + largest
    near = ((anchors[:, 2] > width / 2 - reach) & (anchors[:, 0] < width / 2 + reach)
            & (anchors[:, 3] > height / 2 - reach) & (anchors[:, 1] < height / 2 + reach))
    half = (sizes / 2).view(-1, 1, 1)  # [S, 1, 1]
    faces = torch.cat([centres.unsqueeze(0) - half, centres.unsqueeze(0) + half], dim=-1)  # [S, P, 4]
    best = best_anchor_iou(faces.reshape(-1, 4), anchors[near]).view(len(sizes), -1)  # [S, P]
    matched = best >= iou_threshold
    somewhere, everywhere = matched.any(dim=1), matched.all(dim=1)
    first = (lambda mask: float(sizes[mask][0]) if bool(mask.any()) else float("inf"))
    return first(somewhere), first(everywhere)
