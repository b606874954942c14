"""Per-epoch validation: val losses, detection metrics (``detlab.metrics``) and prediction statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from detlab.config import EvalConfig, ModelConfig
from detlab.data.transforms import denormalize
from detlab.engine.tensorboard import draw_detections
from detlab.metrics import DetectionEvaluator
from detlab.model.matching import assign_targets
from detlab.predict import to_original_frame


@dataclass
class ValidationResult:
    metrics: dict[str, float]
    images: list[np.ndarray] = field(default_factory=list)  # RGB uint8 [H, W, 3], drawn predictions


class _PredictionStats:
    """Number, size and score of predictions above the confidence threshold (original pixels)."""

    def __init__(self, score_threshold: float, large_edge: float) -> None:
        self.score_threshold = score_threshold
        self.large_edge = large_edge
        self.images = 0
        self.count = 0
        self.size_sum = 0.0
        self.large = 0
        self.score_sum = 0.0

    def update(self, predictions: list[dict[str, torch.Tensor]]) -> None:
        self.images += len(predictions)
        for pred in predictions:
            keep = pred["scores"] >= self.score_threshold
            boxes = pred["boxes"][keep]
            max_side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            self.count += int(keep.sum())
            self.size_sum += float(max_side.sum())
            self.large += int((max_side > self.large_edge).sum())
            self.score_sum += float(pred["scores"][keep].sum())

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            "pred_per_image": self.count / max(self.images, 1),
            "pred_mean_size": self.size_sum / n if self.count else 0.0,
            "pred_large_share": self.large / n if self.count else 0.0,
            "mean_score": self.score_sum / n if self.count else 0.0,
        }


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    model_cfg: ModelConfig,
    eval_cfg: EvalConfig,
    device: torch.device,
    amp: bool = False,
    num_images: int = 0,
) -> ValidationResult:
    """Run the model over ``loader`` once; metrics are computed in original image pixels."""
    model.eval()
    evaluator = DetectionEvaluator.from_config(eval_cfg)
    stats = _PredictionStats(eval_cfg.score_threshold, eval_cfg.size_edges[1])
    records = loader.dataset.records
    loss_sums = {"loss_cls": 0.0, "loss_box": 0.0, "loss_total": 0.0}
    num_batches = 0
    drawn: list[np.ndarray] = []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, enabled=amp):
            out = model(images)
        cls_logits = out["cls_logits"].float()  # [B, A, C]
        bbox_regression = out["bbox_regression"].float()  # [B, A, 4]
        gt_input = [t["boxes"].to(device) for t in targets]
        labels, box_targets = assign_targets(model.anchors, gt_input, model.box_coder, model_cfg.match_iou,
                                             model_cfg.ignore_iou)
        losses = criterion(cls_logits, bbox_regression, labels, box_targets)
        for key in loss_sums:
            loss_sums[key] += float(losses[key])
        num_batches += 1

        predictions = model.postprocess(
            cls_logits, bbox_regression, score_floor=eval_cfg.ap_score_floor, nms_iou=eval_cfg.nms_iou,
            pre_nms_top_k=model_cfg.pre_nms_top_k, max_detections=model_cfg.max_detections,
        )
        if len(drawn) < num_images:
            drawn.extend(_draw(images, targets, predictions, eval_cfg.score_threshold, num_images - len(drawn)))
        for pred, target in zip(predictions, targets):
            pred["boxes"], pred["scores"] = to_original_frame(pred["boxes"], target), pred["scores"].float().cpu()
        gt_original = [torch.from_numpy(records[int(t["image_id"])].boxes).float() for t in targets]
        evaluator.update(predictions, gt_original)
        stats.update(predictions)

    metrics = {f"val/{k}": v / max(num_batches, 1) for k, v in loss_sums.items()}
    detection = evaluator.compute()
    metrics.update({f"val/{k}": float(v) for k, v in detection.items()})
    metrics.update({f"val/{k}": v for k, v in stats.compute().items()})
    fp = detection.get("fp", 0)
    metrics["val/fp_small_share"] = float(detection.get("small/fp", 0)) / fp if fp else 0.0
    return ValidationResult(metrics=metrics, images=drawn)


def _draw(
    images: torch.Tensor, targets: list[dict[str, Any]], predictions: list[dict[str, torch.Tensor]],
    score_threshold: float, limit: int,
) -> list[np.ndarray]:
    pictures = denormalize(images[:limit].float().cpu())  # [b, 3, H, W], 0..255
    drawn = []
    for picture, target, pred in zip(pictures, targets, predictions):
        keep = pred["scores"] >= score_threshold
        rgb = picture.clamp(0, 255).byte().permute(1, 2, 0).numpy()
        drawn.append(draw_detections(rgb, target["boxes"].numpy(), pred["boxes"][keep].float().cpu().numpy(),
                                     pred["scores"][keep].float().cpu().numpy()))
    return drawn
