"""SSD box coding with variances: ``xyxy`` boxes <-> regression deltas relative to anchors.

The SSD convention (Liu et al. 2016; the Ultra-Light face detector uses the same numbers):

    dx = (cx_box - cx_anchor) / (var0 * w_anchor)      dw = log(w_box / w_anchor) / var1
    dy = (cy_box - cy_anchor) / (var0 * h_anchor)      dh = log(h_box / h_anchor) / var1

with variances ``(0.1, 0.2)``. This equals torchvision's ``det_utils.BoxCoder`` with weights
``(1/var0, 1/var0, 1/var1, 1/var1) = (10, 10, 5, 5)``; it is re-written here because torchvision's
coder works on lists of ``[N, 4]`` tensors, while the matcher and the post-processing work on
batched ``[B, A, 4]`` tensors and want broadcasting against the shared ``[A, 4]`` anchors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

# Largest log-size ratio a decoded box may have (torchvision's ``bbox_xform_clip``): a wild
# prediction then gives a box at most 62.5x its anchor instead of an ``inf`` that poisons NMS.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode ``xyxy`` boxes as SSD deltas relative to ``xyxy`` anchors, and decode them back.

    Both methods broadcast: ``boxes [B, A, 4]`` against ``anchors [A, 4]`` works, as does any pair
    of shapes ``[..., 4]`` that broadcast.
    """

    def __init__(self, variances: Sequence[float] = (0.1, 0.2), bbox_xform_clip: float = BBOX_XFORM_CLIP) -> None:
        if len(variances) != 2 or min(variances) <= 0:
            raise ValueError(f"BoxCoder: expected two positive variances, got {list(variances)}")
        self.variances = (float(variances[0]), float(variances[1]))
        self.bbox_xform_clip = float(bbox_xform_clip)

    def __repr__(self) -> str:
        return f"BoxCoder(variances={self.variances}, bbox_xform_clip={self.bbox_xform_clip:.4f})"

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """``boxes [..., 4]`` xyxy (positive width and height) -> deltas ``[..., 4]``."""
        var_center, var_size = self.variances
        boxes_c = box_convert(boxes, "xyxy", "cxcywh")  # [..., 4]
        anchors_c = box_convert(anchors, "xyxy", "cxcywh").to(boxes_c.dtype)  # [..., 4]
        center = (boxes_c[..., :2] - anchors_c[..., :2]) / (var_center * anchors_c[..., 2:])
        size = torch.log(boxes_c[..., 2:] / anchors_c[..., 2:]) / var_size
        return torch.cat((center, size), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Deltas ``[..., 4]`` -> xyxy boxes ``[..., 4]`` (log-size clamped, see ``bbox_xform_clip``)."""
        var_center, var_size = self.variances
        anchors_c = box_convert(anchors, "xyxy", "cxcywh").to(deltas.dtype)  # [..., 4]
        center = deltas[..., :2] * var_center * anchors_c[..., 2:] + anchors_c[..., :2]
        log_size = torch.clamp(deltas[..., 2:] * var_size, max=self.bbox_xform_clip)
        size = torch.exp(log_size) * anchors_c[..., 2:]
        return box_convert(torch.cat((center, size), dim=-1), "cxcywh", "xyxy")
