"""Per-epoch validation: the prediction path of ``detlab.prediction`` plus the val losses and drawings.

Detection metrics (``detlab.metrics``) are computed in original image pixels on the same
predictions ``evaluate.py`` makes, so the two agree by construction. ``score_after_training`` is the
run's one test on its last checkpoint (``eval.test_protocol``, through ``detlab.evaluation``).

Under torchrun each rank predicts its share of the batches (the val loader's ``ShardBatchSampler``)
and keeps, per batch, its losses and predictions; rank 0 gathers them in the one-process order
(``gather_in_order``) and scores them with the code a single process runs, so the numbers are the
same to the bit. The pictures are made where the images are and gathered too.
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
from detlab.prediction import BatchPrediction, Prediction, predict_batches
from detlab.run_record import RunPaths, read_test, write_test
from detlab.runtime.distributed import broadcast_object, gather_in_order, gather_object, is_main_process

log = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    metrics: dict[str, float]
    images: list[np.ndarray] = field(default_factory=list)  # RGB uint8 [H, W, 3], drawn predictions
    pr_curve: Optional[dict[str, np.ndarray]] = None  # DetectionEvaluator.pr_curve (eval.pr_curve)
    galleries: dict[str, np.ndarray] = field(default_factory=dict)  # ErrorGallery.pictures, when asked for
    pictures_time_s: float = 0.0  # spent on the PR curve and the galleries (the cost of the pictures)
    shard_images: int = 0  # the images this process predicted (under torchrun its share; else all)


LOSS_NAMES = ("loss_cls", "loss_box", "loss_total")


@dataclass
class _BatchOutcome:
    """What one validation batch contributes, as the process that predicted it sends it to rank 0."""

    position: int  # its first image's id: the order of the batches in the unsplit pass
    losses: dict[str, float]  # the batch's loss values (LOSS_NAMES)
    predictions: list[Prediction]  # per image, original pixels
    drawn: list[np.ndarray]  # its first images drawn, while the process has drawn fewer than num_images


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
    the PR curve (``eval.pr_curve``) and, with ``gallery``, the false-positive / missed-face crops.

    Under torchrun every rank calls it with its share of the batches (a collective); rank 0 returns
    the result of the whole pass, the other ranks one with only ``shard_images``."""
    errors = ErrorGallery(eval_cfg.score_threshold, eval_cfg.iou_threshold, eval_cfg.size_edges,
                          eval_cfg.gallery_size) if gallery else None
    records = loader.dataset.records
    pictures_time, drawn_here = 0.0, 0
    shard: list[_BatchOutcome] = []
    for batch in predict_batches(model, loader, device, eval_cfg, amp):
        gt_input = [t["boxes"].to(device) for t in batch.targets]
        values = criterion(batch.outputs, gt_input, step).values()
        drawn = _draw(batch, eval_cfg.score_threshold, num_images - drawn_here) if drawn_here < num_images else []
        drawn_here += len(drawn)
        predictions = batch.in_original_frame()
        shard.append(_BatchOutcome(predictions[0][0], {k: values[k] for k in LOSS_NAMES}, predictions, drawn))
        if errors is not None:
            started = time.perf_counter()
            errors.update(batch.images, batch.targets, _as_dicts(predictions), _faces(records, predictions))
            pictures_time += time.perf_counter() - started
    shard_images = sum(len(b.predictions) for b in shard)

    batches = gather_in_order(shard, key=lambda b: b.position)  # rank 0: every batch, in the one-process order
    galleries = gather_object((errors, pictures_time)) if errors is not None else None
    if batches is None:
        return ValidationResult(metrics={}, shard_images=shard_images)

    evaluator = DetectionEvaluator.from_config(eval_cfg)
    stats = _PredictionStats(eval_cfg.score_threshold, eval_cfg.size_edges[1])
    loss_sums = dict.fromkeys(LOSS_NAMES, 0.0)
    for outcome in batches:
        for key in loss_sums:
            loss_sums[key] += outcome.losses[key]
        predictions = _as_dicts(outcome.predictions)
        evaluator.update(predictions, _faces(records, outcome.predictions))
        stats.update(predictions)
    metrics = {f"val/{k}": v / max(len(batches), 1) for k, v in loss_sums.items()}
    detection = evaluator.compute()
    metrics.update({f"val/{k}": float(v) for k, v in detection.items()})
    metrics.update({f"val/{k}": v for k, v in stats.compute().items()})
    fp = detection.get("fp", 0)
    metrics["val/fp_small_share"] = float(detection.get("small/fp", 0)) / fp if fp else 0.0
    if galleries is not None:  # each rank's crops of its images; the slowest rank's time
        errors = galleries[0][0]
        for other, _ in galleries[1:]:
            errors.merge(other)
        pictures_time = max(seconds for _, seconds in galleries)
    started = time.perf_counter()
    curve = evaluator.pr_curve() if eval_cfg.pr_curve else None
    pictures = errors.pictures() if errors is not None else {}
    pictures_time += time.perf_counter() - started
    drawn = [picture for outcome in batches for picture in outcome.drawn][:num_images]
    return ValidationResult(metrics=metrics, images=drawn, pr_curve=curve, galleries=pictures,
                            pictures_time_s=pictures_time, shard_images=shard_images)


def _as_dicts(predictions: list[Prediction]) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": boxes, "scores": scores} for _, boxes, scores in predictions]


def _faces(records: list, predictions: list[Prediction]) -> list[torch.Tensor]:
    """The faces of the predicted images (original pixels), from the dataset's records."""
    return [torch.from_numpy(records[image_id].boxes).float() for image_id, _, _ in predictions]


def _draw(batch: BatchPrediction, score_threshold: float, limit: int) -> list[np.ndarray]:
    pictures = denormalize(batch.images[:limit].float().cpu())  # [b, 3, H, W], 0..255
    drawn = []
    for picture, target, pred in zip(pictures, batch.targets, batch.detections):
        keep = pred["scores"] >= score_threshold
        rgb = picture.clamp(0, 255).byte().permute(1, 2, 0).numpy()
        drawn.append(draw_detections(rgb, target["boxes"].numpy(), pred["boxes"][keep].float().cpu().numpy(),
                                     pred["scores"][keep].float().cpu().numpy()))
    return drawn


def score_after_training(paths: RunPaths, cfg: Config, wanted: bool = True) -> bool:
    """``eval.test_protocol``: score the run's last.pt once into test.json (kept: a resumed run that
    trains no further does not redo it; one that trains further removed it when it started), when
    the caller ``wanted`` it. Under torchrun a collective: rank 0 decides (its ``wanted``, the files
    it writes), every rank predicts its share of the images, rank 0 scores them and writes test.json.
    Returns whether it scored."""
    protocol = cfg.eval.test_protocol
    if not protocol:
        return False
    if not broadcast_object(wanted and paths.last.is_file() and not paths.test.is_file()):
        return False
    from detlab.evaluation import test_after_training

    t0 = time.time()
    result = test_after_training(paths.last, protocol, cfg.train.device)
    if not is_main_process():
        return True
    result["test_time_s"] = round(time.time() - t0, 3)
    write_test(paths.root, result)
    log.info("test (%s, eval.input_size=%s): %s", protocol, cfg.eval.input_size, json.dumps(read_test(paths.root)))
    return True
