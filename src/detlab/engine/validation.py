"""Per-epoch validation: the prediction path of ``detlab.prediction`` plus the val losses and drawings.

Detection metrics (``detlab.metrics``) are computed in original image pixels on the same
predictions ``evaluate.py`` makes, so the two agree by construction. ``score_after_training`` is the
run's one test on its last checkpoint (``eval.test_protocol``, through ``detlab.evaluation``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from detlab.config import Config, EvalConfig
from detlab.data.transforms import denormalize
from detlab.engine.pictures import ErrorGallery
from detlab.engine.tensorboard import draw_detections
from detlab.loss import MultiBoxLoss
from detlab.metrics import DetectionEvaluator
from detlab.prediction import BatchPrediction, predict_batches
from detlab.run_record import RunPaths, read_test, write_test

log = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    metrics: dict[str, float]
    images: list[np.ndarray] = field(default_factory=list)  # RGB uint8 [H, W, 3], drawn predictions
    pr_curve: Optional[dict[str, np.ndarray]] = None  # DetectionEvaluator.pr_curve (eval.pr_curve)
    galleries: dict[str, np.ndarray] = field(default_factory=dict)  # ErrorGallery.pictures, when asked for
    pictures_time_s: float = 0.0  # spent on the PR curve and the galleries (the cost of the pictures)


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
    criterion: MultiBoxLoss,
    eval_cfg: EvalConfig,
    device: torch.device,
    step: int,
    amp: bool = False,
    num_images: int = 0,
    gallery: bool = False,
) -> ValidationResult:
    """One pass over ``loader``: ``val/`` losses weighted as at training ``step``, metrics, statistics;
    the PR curve (``eval.pr_curve``) and, with ``gallery``, the false-positive / missed-face crops."""
    evaluator = DetectionEvaluator.from_config(eval_cfg)
    errors = ErrorGallery(eval_cfg.score_threshold, eval_cfg.iou_threshold, eval_cfg.size_edges,
                          eval_cfg.gallery_size) if gallery else None
    pictures_time = 0.0
    stats = _PredictionStats(eval_cfg.score_threshold, eval_cfg.size_edges[1])
    records = loader.dataset.records
    loss_sums = {"loss_cls": 0.0, "loss_box": 0.0, "loss_total": 0.0}
    num_batches = 0
    drawn: list[np.ndarray] = []
    for batch in predict_batches(model, loader, device, eval_cfg, amp):
        gt_input = [t["boxes"].to(device) for t in batch.targets]
        values = criterion(batch.outputs, gt_input, step).values()
        for key in loss_sums:
            loss_sums[key] += values[key]
        num_batches += 1
        if len(drawn) < num_images:
            drawn.extend(_draw(batch, eval_cfg.score_threshold, num_images - len(drawn)))
        predictions = [{"boxes": boxes, "scores": scores} for _, boxes, scores in batch.in_original_frame()]
        gt_original = [torch.from_numpy(records[int(t["image_id"])].boxes).float() for t in batch.targets]
        evaluator.update(predictions, gt_original)
        stats.update(predictions)
        if errors is not None:
            started = time.perf_counter()
            errors.update(batch.images, batch.targets, predictions, gt_original)
            pictures_time += time.perf_counter() - started

    metrics = {f"val/{k}": v / max(num_batches, 1) for k, v in loss_sums.items()}
    detection = evaluator.compute()
    metrics.update({f"val/{k}": float(v) for k, v in detection.items()})
    metrics.update({f"val/{k}": v for k, v in stats.compute().items()})
    fp = detection.get("fp", 0)
    metrics["val/fp_small_share"] = float(detection.get("small/fp", 0)) / fp if fp else 0.0
    started = time.perf_counter()
    curve = evaluator.pr_curve() if eval_cfg.pr_curve else None
    galleries = errors.pictures() if errors is not None else {}
    pictures_time += time.perf_counter() - started
    return ValidationResult(metrics=metrics, images=drawn, pr_curve=curve, galleries=galleries,
                            pictures_time_s=pictures_time)


def _draw(batch: BatchPrediction, score_threshold: float, limit: int) -> list[np.ndarray]:
    pictures = denormalize(batch.images[:limit].float().cpu())  # [b, 3, H, W], 0..255
    drawn = []
    for picture, target, pred in zip(pictures, batch.targets, batch.detections):
        keep = pred["scores"] >= score_threshold
        rgb = picture.clamp(0, 255).byte().permute(1, 2, 0).numpy()
        drawn.append(draw_detections(rgb, target["boxes"].numpy(), pred["boxes"][keep].float().cpu().numpy(),
                                     pred["scores"][keep].float().cpu().numpy()))
    return drawn


def score_after_training(paths: RunPaths, cfg: Config) -> bool:
    """``eval.test_protocol``: score the run's last.pt once into test.json (kept: a resumed run that
    trains no further does not redo it; one that trains further removed it when it started).
    Returns whether it scored."""
    protocol = cfg.eval.test_protocol
    if not protocol or not paths.last.is_file() or paths.test.is_file():
        return False
    from detlab.evaluation import test_after_training

    t0 = time.time()
    result = test_after_training(paths.last, protocol, cfg.train.device)
    result["test_time_s"] = round(time.time() - t0, 3)
    write_test(paths.root, result)
    log.info("test (%s, eval.input_size=%s): %s", protocol, cfg.eval.input_size, json.dumps(read_test(paths.root)))
    return True
