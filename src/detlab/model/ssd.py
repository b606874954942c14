"""The SSD models (``ssd_slim``, ``ssdlite``, ``ssd_vgg16``) and their post-processing.

``SSD`` is deliberately thin: a backbone returning feature maps, a head returning
``cls_logits [B, A, C]`` / ``bbox_regression [B, A, 4]``, fixed anchors ``[A, 4]`` (a buffer, in
input pixels, for the model's fixed input size) and a ``BoxCoder``. The criterion
(``detlab.loss.MultiBoxLoss``) matches and weighs; ``detlab.prediction`` runs ``postprocess``.

Head initialisation (documented because the study is about how training starts):

- ``ssd_slim``: the depthwise part of each separable head conv is Kaiming-normal like the backbone;
  the last (output) conv of every head is N(0, 0.01) with zero bias, so every anchor starts at
  p(face) ~ 0.5 and near-zero deltas (predictions start at the anchors).
- ``ssdlite``: torchvision's ``SSDLiteHead`` (all head convs N(0, 0.03), zero bias).
- ``ssd_vgg16``: torchvision's ``SSDHead`` (Xavier-uniform, zero bias).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import batched_nms, clip_boxes_to_image

from ..config import ModelConfig
from .anchors import default_box_anchors, generate_anchors
from .backbones import (
    SlimBackbone,
    _kaiming_init,
    MobileNetV2FaceBackbone,
    build_mobilenet_v2_face_backbone,
    build_ssdlite_backbone,
    build_vgg_backbone,
    load_backbone_weights,
    resolve_reduced_tail,
    separable_conv,
    ssdlite_norm_layer,
)
from .box_coder import BoxCoder


def _flatten_level(output: Tensor, num_columns: int) -> Tensor:
    """``[B, K*C, H, W] -> [B, H*W*K, C]``: the anchor order of ``detlab.model.anchors``."""
    batch, _, height, width = output.shape
    output = output.view(batch, -1, num_columns, height, width)  # [B, K, C, H, W]
    return output.permute(0, 3, 4, 1, 2).reshape(batch, -1, num_columns)


class SlimHead(nn.Module):
    """Ultra-Light heads: separable convs on all but the last level, a plain 3x3 conv on the last."""

    def __init__(self, in_channels: list[int], num_anchors: list[int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

        def conv(channels: int, outputs: int, last: bool) -> nn.Module:
            if last:
                return nn.Conv2d(channels, outputs, kernel_size=3, padding=1)
            return separable_conv(channels, outputs, kernel_size=3, padding=1)

        levels = len(in_channels)
        self.classification = nn.ModuleList(
            conv(ch, k * num_classes, i == levels - 1) for i, (ch, k) in enumerate(zip(in_channels, num_anchors))
        )
        self.regression = nn.ModuleList(
            conv(ch, k * 4, i == levels - 1) for i, (ch, k) in enumerate(zip(in_channels, num_anchors))
        )
        for head in (*self.classification, *self.regression):
            _kaiming_init(head)
            output = head if isinstance(head, nn.Conv2d) else head[-1]
            nn.init.normal_(output.weight, std=0.01)
            nn.init.zeros_(output.bias)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        cls = [_flatten_level(m(f), self.num_classes) for m, f in zip(self.classification, features)]
        reg = [_flatten_level(m(f), 4) for m, f in zip(self.regression, features)]
        return {"cls_logits": torch.cat(cls, dim=1), "bbox_regression": torch.cat(reg, dim=1)}


class SSD(nn.Module):
    """Single-shot detector on a fixed input size.

    ``forward(images [B, 3, H, W]) -> {"cls_logits": [B, A, C], "bbox_regression": [B, A, 4]}``;
    ``anchors`` is a buffer ``[A, 4]`` xyxy in input pixels in the same anchor order.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        anchors: Tensor,
        box_coder: BoxCoder,
        input_size: tuple[int, int],
        num_classes: int,
        cfg: Optional[ModelConfig] = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("anchors", anchors.float(), persistent=False)  # [A, 4]
        self.box_coder = box_coder
        self.input_size = (int(input_size[0]), int(input_size[1]))  # (W, H)
        self.num_classes = num_classes
        self.cfg = cfg if cfg is not None else ModelConfig()
        # NHWC (see ModelConfig.channels_last): weights are converted here, inputs in forward.
        self.channels_last = bool(self.cfg.channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        width, height = self.input_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (height, width):
            raise ValueError(
                f"SSD: expected images [B, 3, {height}, {width}] (model input size W x H = {width} x {height}), "
                f"got {list(images.shape)}"
            )
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters both heads depend on: the backbone including its extra layers."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def decode(self, bbox_regression: Tensor) -> Tensor:
        """Deltas ``[B, A, 4]`` -> xyxy boxes ``[B, A, 4]`` in input pixels, clipped to the image."""
        boxes = self.box_coder.decode(bbox_regression.float(), self.anchors)
        width, height = self.input_size
        return clip_boxes_to_image(boxes, (height, width))

    @torch.no_grad()
    def postprocess(
        self,
        cls_logits: Tensor,
        bbox_regression: Tensor,
        score_floor: float,
        nms_iou: float,
        pre_nms_top_k: int,
        max_detections: int,
    ) -> list[dict[str, Tensor]]:
        """Scores, top-k, NMS per image, vectorised over the batch (settings: the ``eval`` group).

        The score is the softmax face probability (for ``C > 2``: the best non-background class).
        Returns one ``dict(boxes [K, 4] xyxy input pixels, scores [K])`` per image, sorted by
        descending score.
        """
        batch = cls_logits.shape[0]
        scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:].amax(dim=-1)  # [B, A]
        boxes = self.decode(bbox_regression)  # [B, A, 4]

        k = min(int(pre_nms_top_k), scores.shape[1])
        top_scores, top_idx = scores.topk(k, dim=1)  # [B, k]
        top_boxes = boxes.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, 4))  # [B, k, 4]
        image_idx = torch.arange(batch, device=scores.device).unsqueeze(1).expand(-1, k)  # [B, k]

        keep = top_scores > score_floor  # [B, k]
        flat_boxes, flat_scores, flat_images = top_boxes[keep], top_scores[keep], image_idx[keep]
        # One NMS call for the whole batch: the image index is the "category", so boxes of
        # different images never suppress each other.
        kept = batched_nms(flat_boxes, flat_scores, flat_images, nms_iou)  # sorted by score
        kept = kept[torch.sort(flat_images[kept], stable=True).indices]  # grouped by image, still by score
        counts = torch.bincount(flat_images[kept], minlength=batch).tolist()
        results = []
        for chunk in torch.split(kept, counts):
            chunk = chunk[:max_detections]
            results.append({"boxes": flat_boxes[chunk], "scores": flat_scores[chunk]})
        return results


@torch.no_grad()
def _probe_features(backbone: nn.Module, input_size: tuple[int, int]) -> list[Tensor]:
    """One dummy forward (eval mode: BN on 1x1 maps) to read the real feature-map sizes."""
    width, height = input_size
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        features = backbone(torch.zeros((1, 3, height, width), device=device))
    finally:
        backbone.train(was_training)
    return features


def _build_ssd_slim(cfg: ModelConfig) -> tuple[nn.Module, nn.Module, Tensor]:
    """ssd_slim, and ssd_mobilenet_v2 (the same face anchors and heads on a MobileNetV2 body)."""
    strides = MobileNetV2FaceBackbone.strides if cfg.name == "ssd_mobilenet_v2" else SlimBackbone.strides
    if list(cfg.feature_strides) != list(strides):
        raise ValueError(
            f"model.feature_strides={list(cfg.feature_strides)}: the {cfg.name} network has feature strides "
            f"{list(strides)}"
        )
    if any(len(sizes) == 0 for sizes in cfg.min_sizes):
        raise ValueError(f"model.min_sizes={cfg.min_sizes}: every level needs at least one anchor size")
    if cfg.name == "ssd_mobilenet_v2":
        if not cfg.batch_norm:
            raise ValueError("model.batch_norm=false: MobileNetV2 is defined with BatchNorm (ssd_mobilenet_v2)")
        backbone = build_mobilenet_v2_face_backbone(cfg.backbone_weights, cfg.width_mult)
    else:
        backbone = SlimBackbone(width_mult=cfg.width_mult, batch_norm=cfg.batch_norm)
        load_backbone_weights(backbone, cfg.backbone_weights, imagenet=None, model_name="ssd_slim")
    input_size = (cfg.input_width, cfg.input_height)
    sizes = [tuple(f.shape[-2:]) for f in _probe_features(backbone, input_size)]
    anchors = generate_anchors(input_size, cfg.feature_strides, cfg.min_sizes, feature_sizes=sizes)
    head = SlimHead(backbone.out_channels, [len(s) for s in cfg.min_sizes], cfg.num_classes)
    return backbone, head, anchors


def _build_default_box_model(cfg: ModelConfig) -> tuple[nn.Module, nn.Module, Tensor]:
    input_size = (cfg.input_width, cfg.input_height)
    if cfg.name == "ssdlite":
        backbone = build_ssdlite_backbone(
            cfg.backbone, cfg.backbone_weights, cfg.width_mult, cfg.batch_norm, cfg.reduced_tail
        )
        generator = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    else:
        backbone = build_vgg_backbone(cfg.backbone_weights, batch_norm=cfg.batch_norm, width_mult=cfg.width_mult)
        # torchvision's SSD300 steps tie the anchor centres to a 300 x 300 input; any other size uses
        # the feature-map grid (steps=None), as SSDlite does.
        steps = [8, 16, 32, 64, 100, 300] if input_size == (300, 300) else None
        generator = DefaultBoxGenerator(
            [[2], [2, 3], [2, 3], [2, 3], [2], [2]], scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=steps
        )
    features = _probe_features(backbone, input_size)
    anchors = default_box_anchors(generator, input_size, features)
    num_anchors = generator.num_anchors_per_location()
    out_channels = [f.shape[1] for f in features]
    if cfg.name == "ssdlite":
        head = SSDLiteHead(out_channels, num_anchors, cfg.num_classes, ssdlite_norm_layer())
    else:
        head = SSDHead(out_channels, num_anchors, cfg.num_classes)
    return backbone, head, anchors


def architecture_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``backbone_weights="none"`` and every weight-dependent choice pinned.

    Use it to rebuild a trained model (then ``load_state_dict``) without fetching or reading
    backbone weights: with ``backbone_weights`` alone set to ``none``, torchvision's SSDlite rule
    would switch MobileNetV3 to its reduced tail and the state dict would not fit.
    """
    reduced = cfg.reduced_tail
    if cfg.name == "ssdlite":
        reduced = resolve_reduced_tail(cfg.backbone, cfg.backbone_weights, cfg.reduced_tail)
    return replace(cfg, backbone_weights="none", reduced_tail=reduced)


def build_model(cfg: ModelConfig) -> SSD:
    """Build ``cfg.name`` (``ssd_slim`` | ``ssdlite`` | ``ssd_vgg16``) for ``cfg.input_width x input_height``.

    ``model.cfg`` keeps ``cfg``; ``architecture_config(cfg)`` rebuilds the same network without weights.
    """
    if cfg.name in ("ssd_slim", "ssd_mobilenet_v2"):
        backbone, head, anchors = _build_ssd_slim(cfg)
    elif cfg.name in ("ssdlite", "ssd_vgg16"):
        backbone, head, anchors = _build_default_box_model(cfg)
    else:
        raise ValueError(f"model.name={cfg.name!r}: expected one of ssd_slim, ssd_mobilenet_v2, ssdlite, ssd_vgg16")
    return SSD(
        backbone,
        head,
        anchors,
        BoxCoder(cfg.variances),
        (cfg.input_width, cfg.input_height),
        cfg.num_classes,
        cfg,
    )
