"""TensorBoard output: scalars, prediction images, PR curves, findings text and the HParams record."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

GT_COLOUR = (0, 255, 0)  # RGB
PRED_COLOUR = (255, 64, 64)


def open_writer(run_dir: Path, resume_step: int | None) -> SummaryWriter:
    # purge_step drops events a killed run wrote after its last checkpoint, so resumed curves
    # do not double back on themselves.
    return SummaryWriter(log_dir=str(run_dir), purge_step=resume_step)


def add_scalars(writer: SummaryWriter, values: Mapping[str, float], step: int) -> None:
    for tag, value in values.items():
        if value is not None and np.isfinite(value):
            writer.add_scalar(tag, float(value), step)


def add_pr_curve(writer: SummaryWriter, tag: str, curve: Mapping[str, np.ndarray], step: int) -> None:
    """A detection PR curve (``DetectionEvaluator.pr_curve``) in TensorBoard's PR-curves tab.

    ``add_pr_curve`` takes per-example labels and cannot count the faces no prediction found; the raw
    form takes the counts, so recall is over all faces. There are no true negatives in detection.
    """
    tp, fp, fn = (np.asarray(curve[k], dtype=np.float64) for k in ("tp", "fp", "fn"))
    writer.add_pr_curve_raw(tag, tp, fp, np.zeros_like(tp), fn, np.asarray(curve["precision"], dtype=np.float64),
                            np.asarray(curve["recall"], dtype=np.float64), step, num_thresholds=len(tp))


def draw_detections(
    image: np.ndarray, gt_boxes: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray
) -> np.ndarray:
    """Draw ground truth (green) and predictions (red, with score) on an RGB uint8 ``[H, W, 3]`` image."""
    canvas = np.ascontiguousarray(image.copy())
    for x1, y1, x2, y2 in np.round(gt_boxes).astype(int):
        cv2.rectangle(canvas, (x1, y1), (x2, y2), GT_COLOUR, 1)
    for (x1, y1, x2, y2), score in zip(np.round(pred_boxes).astype(int), pred_scores):
        cv2.rectangle(canvas, (x1, y1), (x2, y2), PRED_COLOUR, 1)
        cv2.putText(canvas, f"{score:.2f}", (x1, max(y1 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                    PRED_COLOUR, 1, cv2.LINE_AA)
    return canvas


def write_hparams(writer: SummaryWriter, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Record the run's hyper-parameters with its final metrics for TensorBoard's HParams tab.

    ``SummaryWriter.add_hparams`` writes into a new sub-directory, which splits a run in two in the
    runs list; writing the three summaries into the run's own event file keeps one run per folder.
    """
    clean = {k: _hparam_value(v) for k, v in hparams.items()}
    metric_tags = {f"hparam/{k}": float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    experiment, session_start, session_end = hparams_summary(clean, metric_tags)
    file_writer = writer._get_file_writer()
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    for tag, value in metric_tags.items():
        writer.add_scalar(tag, value, 0)


def _hparam_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or isinstance(value, torch.Tensor):
        return value
    return str(value)
