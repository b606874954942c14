"""Anchors (SSD "default boxes") as ``xyxy`` boxes in input pixels.

Two generators:

- ``generate_anchors``: the square anchors of the Ultra-Light face detector (``ssd_slim``). On level
  ``k`` with stride ``s`` and a feature map of ``H_k x W_k`` cells, cell ``(i, j)`` has centre
  ``((j + 0.5) * s, (i + 0.5) * s)`` and one square anchor per size in ``min_sizes[k]``.
- ``default_box_anchors``: torchvision's ``DefaultBoxGenerator`` (``ssdlite``, ``ssd_vgg16``), run on
  the real feature maps so its sizes, aspect ratios and centres are exactly torchvision's.

Order (both): level, then row ``i``, then column ``j``, then the anchors of that cell. The heads
flatten their outputs ``[B, K*C, H, W] -> [B, H*W*K, C]`` in that same order.

Anchors are not clipped to the image: an anchor centred on a border cell keeps its full size, so
its encoded targets and decoded boxes use the same geometry everywhere (the decoded *predictions*
are clipped in post-processing). torchvision's generator clamps only normalised widths/heights
above 1 (its ``clip=True``); that is kept as is.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList


def feature_map_sizes(image_size: tuple[int, int], feature_strides: Sequence[int]) -> list[tuple[int, int]]:
    """``(H_k, W_k)`` per stride for ``image_size = (W, H)``: ``ceil(size / stride)``.

    This is what a chain of stride-2, kernel-3, padding-1 convolutions produces.
    """
    width, height = image_size
    return [(math.ceil(height / s), math.ceil(width / s)) for s in feature_strides]


def generate_anchors(
    image_size: tuple[int, int],
    feature_strides: Sequence[int],
    min_sizes: Sequence[Sequence[float]],
    feature_sizes: Optional[Sequence[tuple[int, int]]] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Square anchors ``[A, 4]`` xyxy in input pixels; ``A = sum_k H_k * W_k * len(min_sizes[k])``.

    ``image_size`` is ``(W, H)``; ``feature_sizes`` (``(H_k, W_k)`` per level) defaults to
    ``feature_map_sizes(image_size, feature_strides)``.
    """
    if len(feature_strides) != len(min_sizes):
        raise ValueError(
            f"generate_anchors: {len(feature_strides)} feature strides but {len(min_sizes)} min_sizes lists"
        )
    if feature_sizes is None:
        feature_sizes = feature_map_sizes(image_size, feature_strides)
    per_level = []
    for stride, sizes, (rows, cols) in zip(feature_strides, min_sizes, feature_sizes):
        ys = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * stride  # [H_k]
        xs = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * stride  # [W_k]
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # [H_k, W_k]
        centers = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2)  # [H_k*W_k, 1, 2]
        half = torch.as_tensor(sizes, dtype=torch.float32, device=device).view(1, -1, 1) / 2  # [1, K, 1]
        boxes = torch.cat((centers - half, centers + half), dim=-1)  # [H_k*W_k, K, 4]
        per_level.append(boxes.reshape(-1, 4))
    return torch.cat(per_level, dim=0)


def default_box_anchors(
    generator: DefaultBoxGenerator, image_size: tuple[int, int], feature_maps: list[Tensor]
) -> Tensor:
    """torchvision's default boxes for ``feature_maps`` at ``image_size = (W, H)``: ``[A, 4]`` xyxy."""
    width, height = image_size
    # The generator reads only the padded batch shape and the image sizes from the ImageList.
    images = ImageList(feature_maps[0].new_empty((1, 3, height, width)), [(height, width)])
    return generator(images, feature_maps)[0].float()
