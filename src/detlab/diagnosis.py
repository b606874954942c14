"""Failure-pattern detectors for SSD training, and the interventions they drive.

The paper's thesis: an imbalanced class/box loss-weight pair, missing hard negative mining or a
missing learning-rate warm-up make training fall into recognisable patterns. ``Diagnoser`` watches
the signals the training loop already has, names the pattern with its evidence and the paper's
suggested remedy (a ``Finding``), and tells the loop when to stop. ``LossWeightSchedule`` is the
proposed refinement (classification first, box weight ramped up later).

Detectors (``DETECTORS``), each firing at most one ``Finding`` per run, at its onset:

- ``avoidance``: predictions per image collapse (< ``avoidance_max_pred_per_image``) with recall
  near zero while ``loss_cls`` fell: the model predicts only background. Epochs before the late stage.
- ``stuck``: mean total loss of the last window of the early stage is not ``stuck_min_drop`` below
  the first window. Decided once, at the last early step.
- ``loss_imbalance``: median of ``g_box / g_cls`` (gradient norms of the two weighted terms on the
  shared parameters, sampled every ``grad_norm_every`` steps) above ``imbalance_ratio`` or below its
  inverse. Samples taken while the adaptive schedule is still ramping are skipped (that imbalance
  is intended).
- ``random_large_boxes``: on epochs containing early steps, most predictions are large
  (``val/pred_large_share``) and precision is low.
- ``small_fp_explosion``: in the mid stage, ``val/fp`` rose for ``fp_rise_epochs`` epochs, most
  false positives are small and ``train/loss_cls`` stagnates.
- ``overfitting``: after the early stage, ``val/loss_total`` rose (or ``val/miou`` fell) for
  ``overfit_epochs`` epochs while ``train/loss_total`` fell.
- ``divergence``: a non-finite loss, ``nonfinite_grad_patience`` consecutive non-finite gradient
  norms (isolated ones are AMP overflows the scaler skips), or the gradient norm / raw loss above
  ``diverge_*_factor`` times its running median for ``diverge_patience`` consecutive steps.

Re-arming: a detector never fires twice in a run (the finding records the onset); its TensorBoard
scalar (``Diagnoser.scalars``) follows whether the condition holds now, so a cleared pattern shows.
Stages: step ``s`` is early if ``s < early_end_step``, late if ``s >= late_start_step``, else mid;
an epoch finding takes the stage of the epoch's last step (``step - 1``, ``step`` = steps done).

All per-step work is O(1) amortised on Python floats (deques, a bisect-sorted median window); no
tensors are kept and nothing is written: the training loop owns the console, TensorBoard and files.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch

from detlab.config import AdaptiveWeightsConfig, DiagnosisConfig

EARLY, MID, LATE = "early", "mid", "late"

AVOIDANCE = "avoidance"
STUCK = "stuck"
IMBALANCE = "loss_imbalance"
LARGE_BOXES = "random_large_boxes"
SMALL_FP = "small_fp_explosion"
OVERFITTING = "overfitting"
DIVERGENCE = "divergence"
DETECTORS = (AVOIDANCE, STUCK, IMBALANCE, LARGE_BOXES, SMALL_FP, OVERFITTING, DIVERGENCE)

# Early-stopping metrics where higher is better (the rest are val losses: lower is better).
HIGHER_IS_BETTER = frozenset({"miou", "recall", "precision", "f1", "ap50", "mean_tp_iou"})

REMEDIES = {
    AVOIDANCE: "use hard negative mining (loss.neg_pos_ratio=3) so background anchors cannot swamp the "
               "classification loss, add learning-rate warm-up, raise loss.class_weight relative to "
               "loss.box_weight, and check eval.score_threshold is not above the model's scores",
    STUCK: "add learning-rate warm-up (schedule.warmup=true) and check the learning rate; rebalance "
           "loss.class_weight / loss.box_weight",
    IMBALANCE + "/box": "raise loss.class_weight or lower loss.box_weight until the two gradient norms are "
                        "within a few times of each other, or emphasise classification early with "
                        "diagnosis.adaptive_weights.enabled=true",
    IMBALANCE + "/cls": "raise loss.box_weight (or lower loss.class_weight) so localisation is learnt; "
                        "diagnosis.adaptive_weights ramps the box weight up after the early stage",
    LARGE_BOXES: "add learning-rate warm-up and emphasise classification early (lower box weight early, "
                 "diagnosis.adaptive_weights.enabled=true); check the anchor sizes match the faces",
    SMALL_FP: "strengthen hard negative mining (loss.neg_pos_ratio), tune (raise) the confidence threshold "
              "eval.score_threshold, raise loss.class_weight",
    OVERFITTING: "early stopping on val mIoU (diagnosis.early_stopping_patience; the best checkpoint is kept), "
                 "stronger augmentation (dataset.augment.*), more weight decay or more data",
    DIVERGENCE: "lower optim.lr, keep learning-rate warm-up, clip gradients (optim.grad_clip_norm), "
                "lower the largest loss weight",
}


# ------------------------------------------------------------------------------------ findings
@dataclass
class Finding:
    """One detected failure pattern: where it fired, the numbers behind it and the remedy."""

    detector: str
    stage: str  # early | mid | late
    step: int
    epoch: int
    message: str
    evidence: dict[str, float] = field(default_factory=dict)
    remedy: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain types for summary.json and checkpoints (non-finite evidence stays a float)."""
        return {"detector": self.detector, "stage": self.stage, "step": int(self.step), "epoch": int(self.epoch),
                "message": self.message, "evidence": {k: float(v) for k, v in self.evidence.items()},
                "remedy": self.remedy}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Finding":
        return cls(detector=data["detector"], stage=data["stage"], step=int(data["step"]),
                   epoch=int(data["epoch"]), message=data.get("message", ""),
                   evidence=dict(data.get("evidence", {})), remedy=data.get("remedy", ""))

    def console_line(self) -> str:
        evidence = ", ".join(f"{k}={v:.4g}" for k, v in self.evidence.items())
        return (f"[diagnosis] {self.detector} ({self.stage} stage, epoch {self.epoch}, step {self.step}): "
                f"{self.message} [{evidence}] -> remedy: {self.remedy}")


def is_finite_loss(value: Any) -> bool:
    """True for a finite number or an all-finite tensor; False for nan/inf/None."""
    if value is None:
        return False
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------- gradient-norm ratio
def loss_term_grad_norms(
    loss_cls_weighted: torch.Tensor,
    loss_box_weighted: torch.Tensor,
    shared_params: Iterable[torch.nn.Parameter],
    scale: float = 1.0,
) -> tuple[float, float]:
    """L2 norms of the gradients of the two weighted loss terms on the shared parameters.

    Call before the usual ``backward``: the graph is retained and ``.grad`` is left untouched. A term
    that does not depend on the parameters (or a zero weight) gives 0.0. Under fp16 autocast pass
    ``scale=scaler.get_scale()`` so small gradients do not underflow; the norms are unscaled again
    (an overflowing step then returns inf, which the diagnoser ignores).
    """
    params = [p for p in shared_params if p.requires_grad]
    norms = [_grad_norm(loss, params, scale) for loss in (loss_cls_weighted, loss_box_weighted)]
    device = next((n.device for n in norms if isinstance(n, torch.Tensor)), None)
    if device is None:
        return 0.0, 0.0
    values = torch.stack([n if isinstance(n, torch.Tensor) else torch.zeros((), device=device) for n in norms])
    g_cls, g_box = (values / scale).tolist()  # one host sync for both
    return float(g_cls), float(g_box)


def _grad_norm(loss: Any, params: list[torch.nn.Parameter], scale: float) -> Optional[torch.Tensor]:
    if not params or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return None
    grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, params, retain_graph=True,
                                allow_unused=True)
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads if g is not None]
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack(norms))


# ------------------------------------------------------------------------ adaptive loss weights
class LossWeightSchedule:
    """Effective ``(class_weight, box_weight)`` per step; constant unless ``adaptive_weights.enabled``.

    Factor ``f(step)`` goes from the start factor (until ``ramp_start_fraction * total_steps``) to 1
    (from ``ramp_end_fraction * total_steps``), linearly or on a half cosine in between.
    """

    def __init__(self, cfg: Union[DiagnosisConfig, AdaptiveWeightsConfig], class_weight: float, box_weight: float,
                 total_steps: int) -> None:
        aw: AdaptiveWeightsConfig = getattr(cfg, "adaptive_weights", cfg)
        self.enabled = bool(aw.enabled)
        self.class_weight = float(class_weight)
        self.box_weight = float(box_weight)
        self.start_class_factor = float(aw.start_class_factor)
        self.start_box_factor = float(aw.start_box_factor)
        self.shape = aw.shape
        self.ramp_start = int(round(aw.ramp_start_fraction * total_steps))
        self.ramp_end = max(self.ramp_start, int(round(aw.ramp_end_fraction * total_steps)))

    def progress(self, step: int) -> float:
        """0 before the ramp, 1 after it."""
        if step < self.ramp_start:
            return 0.0
        if step >= self.ramp_end:
            return 1.0
        t = (step - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return 0.5 * (1.0 - math.cos(math.pi * t)) if self.shape == "cosine" else t

    def ramping(self, step: int) -> bool:
        return self.enabled and step < self.ramp_end

    def weights(self, step: int) -> tuple[float, float]:
        if not self.enabled:
            return self.class_weight, self.box_weight
        p = self.progress(step)
        class_factor = self.start_class_factor + (1.0 - self.start_class_factor) * p
        box_factor = self.start_box_factor + (1.0 - self.start_box_factor) * p
        return self.class_weight * class_factor, self.box_weight * box_factor


# ----------------------------------------------------------------------------- rolling windows
class _RollingMedian:
    """Median of the last ``size`` values: a deque for order, a sorted list (bisect) for the median."""

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self._sorted: list[float] = []
        for value in values:
            self.push(value)

    def __len__(self) -> int:
        return len(self.values)

    def push(self, value: float) -> None:
        if len(self.values) == self.size:
            old = self.values.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self.values.append(value)
        bisect.insort(self._sorted, value)

    def median(self) -> float:
        n = len(self._sorted)
        if n == 0:
            return math.nan
        mid = n // 2
        return self._sorted[mid] if n % 2 else 0.5 * (self._sorted[mid - 1] + self._sorted[mid])


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else math.nan


def _relative_drop(start: float, now: float) -> float:
    """(start - now) / |start|; positive when the value fell."""
    return (start - now) / abs(start) if start != 0 else math.nan


def _strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


EPOCH_KEYS = ("train/loss_cls", "train/loss_total", "val/loss_total", "val/miou", "val/fp")


# ---------------------------------------------------------------------------------- diagnoser
class Diagnoser:
    """Watches per-step and per-epoch signals; returns new ``Finding``s and decides early stops."""

    def __init__(self, cfg: DiagnosisConfig, total_steps: int, steps_per_epoch: int, early_end_step: int,
                 late_start_step: int) -> None:
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.early_end_step = max(0, int(early_end_step))
        self.late_start_step = max(self.early_end_step, int(late_start_step))
        # "The first part of training": the early stage, or the first stuck_min_fraction of the steps
        # when that is longer. Both loss windows fit in it without overlapping.
        self.stuck_end_step = max(self.early_end_step, math.ceil(cfg.stuck_min_fraction * self.total_steps))
        self.loss_window = max(1, min(cfg.loss_window, self.stuck_end_step // 2))
        self._schedule = LossWeightSchedule(cfg, 1.0, 1.0, self.total_steps)
        self.findings: list[Finding] = []
        self._active = dict.fromkeys(DETECTORS, False)
        self._reset_windows()
        self._es_best: Optional[float] = None
        self._es_best_epoch = 0
        self._es_bad_epochs = 0
        self._stop: tuple[bool, str] = (False, "")

    def _reset_windows(self) -> None:
        cfg = self.cfg
        self._first_total: list[float] = []  # the first loss_window finite values of training
        self._first_cls: list[float] = []
        self._recent_total: deque[float] = deque(maxlen=self.loss_window)
        self._recent_cls: deque[float] = deque(maxlen=self.loss_window)
        self._stuck_checked = False
        self._ratio_samples: deque[tuple[float, float]] = deque(maxlen=cfg.imbalance_window)
        self._grad_median = _RollingMedian(cfg.diverge_window)
        self._loss_median = _RollingMedian(cfg.diverge_window)
        self._grad_explode_run = 0
        self._loss_explode_run = 0
        self._nonfinite_grad_run = 0
        self._epochs: deque[dict[str, float]] = deque(maxlen=max(cfg.fp_rise_epochs, cfg.overfit_epochs) + 1)
        self._first_epoch_cls = math.nan
        self._peak_pred_per_image = math.nan
        self._best_miou = math.nan
        self._best_miou_epoch = 0

    # ------------------------------------------------------------------------------ public API
    def stage_of(self, step: int) -> str:
        if step < self.early_end_step:
            return EARLY
        return MID if step < self.late_start_step else LATE

    def wants_grad_norms(self, step: int) -> bool:
        return bool(self.cfg.enabled) and step % self.cfg.grad_norm_every == 0

    def fired(self, detector: str) -> bool:
        return any(f.detector == detector for f in self.findings)

    def scalars(self) -> dict[str, float]:
        """One 0/1 value per detector (does its condition hold now?), for ``diagnosis/<detector>``."""
        if not self.cfg.enabled:
            return {}
        return {name: float(active) for name, active in self._active.items()}

    def should_stop(self) -> tuple[bool, str]:
        """(stop, reason); the reason starts with "diverged", "stuck" or "early stopping"."""
        return self._stop

    @property
    def best_metric(self) -> tuple[Optional[float], int]:
        """Best value of ``val/<early_stopping_metric>`` so far and its epoch (None, 0 before any)."""
        return self._es_best, self._es_best_epoch

    def observe_step(self, step: int, epoch: int, signals: dict[str, float]) -> list[Finding]:
        """Signals: loss_cls, loss_box (unweighted), loss_total (weighted), lr, grad_norm, num_pos,
        and on sampled steps grad_norm_cls, grad_norm_box. Returns only the findings new at this step."""
        if not self.cfg.enabled:
            return []
        new: list[Finding] = []
        self._check_divergence_step(step, epoch, signals, new)
        loss_total, loss_cls = signals.get("loss_total"), signals.get("loss_cls")
        for value, first, recent in ((loss_total, self._first_total, self._recent_total),
                                     (loss_cls, self._first_cls, self._recent_cls)):
            if is_finite_loss(value):
                if len(first) < self.loss_window:
                    first.append(float(value))
                recent.append(float(value))
        if not self._stuck_checked and self.stuck_end_step >= 2 and step >= self.stuck_end_step - 1:
            self._stuck_checked = True
            self._check_stuck(step, epoch, signals, new)
        if "grad_norm_cls" in signals and "grad_norm_box" in signals:
            self._check_imbalance(step, epoch, float(signals["grad_norm_cls"]), float(signals["grad_norm_box"]), new)
        if new:
            self._refresh_stop()
        return new

    def observe_epoch(self, epoch: int, step: int, signals: dict[str, float]) -> list[Finding]:
        """Epoch-end signals (train/* means, val/* metrics); ``step`` = optimiser steps done so far.
        Returns only the findings new at this epoch. Early stopping is tracked even when disabled."""
        new: list[Finding] = []
        self._update_early_stopping(epoch, signals)
        if self.cfg.enabled:
            record = {key: float(signals.get(key, math.nan)) for key in EPOCH_KEYS}
            self._epochs.append(record)
            if math.isnan(self._first_epoch_cls):
                self._first_epoch_cls = record["train/loss_cls"]
            ppi = float(signals.get("val/pred_per_image", math.nan))
            if math.isfinite(ppi) and (math.isnan(self._peak_pred_per_image) or ppi > self._peak_pred_per_image):
                self._peak_pred_per_image = ppi
            miou = record["val/miou"]
            if math.isfinite(miou) and (math.isnan(self._best_miou) or miou > self._best_miou):
                self._best_miou, self._best_miou_epoch = miou, epoch
            stage = self.stage_of(max(step - 1, 0))
            if "val/loss_total" in signals and not is_finite_loss(signals["val/loss_total"]):
                self._fire(new, DIVERGENCE, step, epoch, "validation loss is not finite",
                           {"val_loss_total": float(signals["val/loss_total"])}, stage=stage)
            self._check_avoidance(epoch, step, stage, signals, new)
            self._check_large_boxes(epoch, step, stage, signals, new)
            self._check_small_fp(epoch, step, stage, signals, new)
            self._check_overfitting(epoch, step, stage, new)
        self._refresh_stop()
        return new

    # ----------------------------------------------------------------------------- detectors
    def _fire(self, new: list[Finding], detector: str, step: int, epoch: int, message: str,
              evidence: dict[str, float], remedy: Optional[str] = None, stage: Optional[str] = None) -> None:
        """Mark the detector active; record a finding only the first time it fires in the run."""
        self._active[detector] = True
        if self.fired(detector):
            return
        finding = Finding(detector=detector, stage=stage or self.stage_of(step), step=int(step), epoch=int(epoch),
                          message=message, evidence={k: float(v) for k, v in evidence.items()},
                          remedy=remedy or REMEDIES[detector])
        self.findings.append(finding)
        new.append(finding)

    def _check_divergence_step(self, step: int, epoch: int, signals: dict[str, float], new: list[Finding]) -> None:
        cfg = self.cfg
        loss_total = signals.get("loss_total", math.nan)
        parts = [signals[k] for k in ("loss_cls", "loss_box") if k in signals]
        raw = math.fsum(float(v) for v in parts) if parts else float(loss_total)
        lr = float(signals.get("lr", math.nan))
        if not (is_finite_loss(loss_total) and is_finite_loss(raw)):
            self._fire(new, DIVERGENCE, step, epoch, "loss is not finite",
                       {"loss_total": float(loss_total), "loss_cls": float(signals.get("loss_cls", math.nan)),
                        "loss_box": float(signals.get("loss_box", math.nan)), "lr": lr})
            return
        median = self._loss_median.median()
        exploding = len(self._loss_median) >= cfg.diverge_min_history and raw > cfg.diverge_loss_factor * median
        self._loss_explode_run = self._loss_explode_run + 1 if exploding else 0
        self._loss_median.push(raw)
        if self._loss_explode_run >= cfg.diverge_patience:
            self._fire(new, DIVERGENCE, step, epoch,
                       f"raw loss {raw:.4g} is {raw / median:.3g}x its running median for "
                       f"{self._loss_explode_run} steps",
                       {"loss_raw": raw, "loss_median": median, "factor": raw / median,
                        "steps": self._loss_explode_run, "lr": lr})
        if "grad_norm" not in signals:
            return
        grad = float(signals["grad_norm"])
        if not math.isfinite(grad):
            self._nonfinite_grad_run += 1
            if self._nonfinite_grad_run >= cfg.nonfinite_grad_patience:
                self._fire(new, DIVERGENCE, step, epoch,
                           f"gradient norm not finite for {self._nonfinite_grad_run} consecutive steps",
                           {"grad_norm": grad, "steps": self._nonfinite_grad_run, "lr": lr})
            return
        self._nonfinite_grad_run = 0
        median = self._grad_median.median()
        exploding = len(self._grad_median) >= cfg.diverge_min_history and grad > cfg.diverge_grad_factor * median
        self._grad_explode_run = self._grad_explode_run + 1 if exploding else 0
        self._grad_median.push(grad)
        if self._grad_explode_run >= cfg.diverge_patience:
            self._fire(new, DIVERGENCE, step, epoch,
                       f"gradient norm {grad:.4g} is {grad / median:.3g}x its running median for "
                       f"{self._grad_explode_run} steps",
                       {"grad_norm": grad, "grad_norm_median": median, "factor": grad / median,
                        "steps": self._grad_explode_run, "lr": lr})

    def _check_stuck(self, step: int, epoch: int, signals: dict[str, float], new: list[Finding]) -> None:
        if not self._first_total or not self._recent_total:
            return
        first, last = _mean(self._first_total), _mean(self._recent_total)
        drop = _relative_drop(first, last)
        stuck = not drop >= self.cfg.stuck_min_drop  # a nan drop (first mean 0) counts as stuck too
        self._active[STUCK] = stuck
        if stuck:
            self._fire(new, STUCK, step, epoch,
                       f"total loss fell only {100 * drop:.1f}% over the first {self.stuck_end_step} steps "
                       f"({first:.4g} -> {last:.4g}, {self.loss_window}-step windows)",
                       {"loss_first_window": first, "loss_last_window": last, "relative_drop": drop,
                        "min_drop": self.cfg.stuck_min_drop, "window_steps": self.loss_window,
                        "lr": float(signals.get("lr", math.nan))})

    def _check_imbalance(self, step: int, epoch: int, g_cls: float, g_box: float, new: list[Finding]) -> None:
        if not (math.isfinite(g_cls) and math.isfinite(g_box)) or (g_cls <= 0 and g_box <= 0):
            return
        if self._schedule.ramping(step):
            return  # the adaptive schedule emphasises classification on purpose
        self._ratio_samples.append((g_cls, g_box))
        if len(self._ratio_samples) < self.cfg.imbalance_min_samples:
            return
        ratios = [b / c if c > 0 else math.inf for c, b in self._ratio_samples]
        ratio = statistics.median(ratios)
        threshold = self.cfg.imbalance_ratio
        dominant = "box" if ratio > threshold else "cls" if ratio < 1.0 / threshold else None
        self._active[IMBALANCE] = dominant is not None
        if dominant is None:
            return
        g_cls_med = statistics.median(c for c, _ in self._ratio_samples)
        g_box_med = statistics.median(b for _, b in self._ratio_samples)
        factor = ratio if dominant == "box" else (1.0 / ratio if ratio > 0 else math.inf)
        term, other = ("box", "class") if dominant == "box" else ("class", "box")
        self._fire(new, IMBALANCE, step, epoch,
                   f"the {term} term dominates the update: its gradient norm on the shared parameters is "
                   f"{factor:.3g}x the {other} term's (median of {len(ratios)} samples)",
                   {"ratio_box_to_cls": ratio, "grad_norm_cls": g_cls_med, "grad_norm_box": g_box_med,
                    "box_dominates": float(dominant == "box"), "threshold": threshold, "samples": len(ratios)},
                   remedy=REMEDIES[f"{IMBALANCE}/{dominant}"])

    def _check_avoidance(self, epoch: int, step: int, stage: str, signals: dict[str, float],
                         new: list[Finding]) -> None:
        cfg = self.cfg
        if self._first_cls and self._recent_cls:
            cls_first, cls_now = _mean(self._first_cls), _mean(self._recent_cls)
        else:  # no step signals: compare epoch means with the first epoch's
            cls_first, cls_now = self._first_epoch_cls, float(signals.get("train/loss_cls", math.nan))
        drop = _relative_drop(cls_first, cls_now)
        ppi = float(signals.get("val/pred_per_image", math.nan))
        recall = float(signals.get("val/recall", math.nan))
        active = (stage != LATE and ppi < cfg.avoidance_max_pred_per_image and recall < cfg.avoidance_max_recall
                  and drop >= cfg.avoidance_min_cls_drop)
        self._active[AVOIDANCE] = active
        if active:
            evidence = {"pred_per_image": ppi, "recall": recall, "loss_cls_first": cls_first,
                        "loss_cls_now": cls_now, "loss_cls_drop": drop,
                        "peak_pred_per_image": self._peak_pred_per_image}
            if "val/mean_score" in signals:
                evidence["mean_score"] = float(signals["val/mean_score"])
            self._fire(new, AVOIDANCE, step, epoch,
                       f"the model predicts only background: {ppi:.3g} boxes per image, recall {recall:.3g}, "
                       f"while loss_cls fell {100 * drop:.0f}%", evidence, stage=stage)

    def _check_large_boxes(self, epoch: int, step: int, stage: str, signals: dict[str, float],
                           new: list[Finding]) -> None:
        cfg = self.cfg
        early_epoch = (epoch - 1) * self.steps_per_epoch < self.early_end_step  # the epoch has early steps
        ppi = float(signals.get("val/pred_per_image", math.nan))
        share = float(signals.get("val/pred_large_share", math.nan))
        precision = float(signals.get("val/precision", math.nan))
        active = (early_epoch and ppi >= cfg.large_box_min_pred_per_image and share >= cfg.large_box_share
                  and precision < cfg.large_box_max_precision)
        self._active[LARGE_BOXES] = active
        if active:
            self._fire(new, LARGE_BOXES, step, epoch,
                       f"{100 * share:.0f}% of the predicted boxes are large with precision {precision:.3g}: "
                       f"boxes are placed at random before the classifier has learnt faces",
                       {"pred_large_share": share, "precision": precision, "pred_per_image": ppi,
                        "pred_mean_size": float(signals.get("val/pred_mean_size", math.nan))}, stage=stage)

    def _check_small_fp(self, epoch: int, step: int, stage: str, signals: dict[str, float],
                        new: list[Finding]) -> None:
        cfg = self.cfg
        k = cfg.fp_rise_epochs
        history = list(self._epochs)[-(k + 1):]
        active = False
        if stage == MID and len(history) == k + 1:
            fps = [r["val/fp"] for r in history]
            cls = [r["train/loss_cls"] for r in history]
            growth = (fps[-1] - fps[0]) / max(fps[0], 1.0)
            small_share = float(signals.get("val/fp_small_share", math.nan))
            cls_drop = _relative_drop(cls[0], cls[-1])
            active = (_strictly_increasing(fps) and growth >= cfg.fp_min_growth and small_share >= cfg.fp_small_share
                      and cls_drop < cfg.fp_cls_stagnation)
        self._active[SMALL_FP] = active
        if active:
            self._fire(new, SMALL_FP, step, epoch,
                       f"false positives rose for {k} epochs ({fps[0]:.0f} -> {fps[-1]:.0f}), "
                       f"{100 * small_share:.0f}% of them small, while loss_cls stagnates "
                       f"({100 * cls_drop:.1f}% change)",
                       {"fp_start": fps[0], "fp_now": fps[-1], "fp_growth": growth, "fp_small_share": small_share,
                        "loss_cls_start": cls[0], "loss_cls_now": cls[-1], "loss_cls_drop": cls_drop,
                        "precision": float(signals.get("val/precision", math.nan)), "epochs": k}, stage=stage)

    def _check_overfitting(self, epoch: int, step: int, stage: str, new: list[Finding]) -> None:
        cfg = self.cfg
        k = cfg.overfit_epochs
        history = list(self._epochs)[-(k + 1):]
        if stage == EARLY or len(history) < k + 1:
            self._active[OVERFITTING] = False
            return
        train = [r["train/loss_total"] for r in history]
        val = [r["val/loss_total"] for r in history]
        miou = [r["val/miou"] for r in history]
        train_falls = train[-1] < train[0]
        val_rise = -_relative_drop(val[0], val[-1])
        miou_fall = _relative_drop(miou[0], miou[-1])
        val_rising = _strictly_increasing(val) and val_rise >= cfg.overfit_min_change
        miou_falling = _strictly_increasing(miou[::-1]) and miou_fall >= cfg.overfit_min_change
        active = train_falls and (val_rising or miou_falling)
        self._active[OVERFITTING] = active
        if active:
            what = " and ".join(s for s, on in ((f"val loss rose {100 * val_rise:.1f}%", val_rising),
                                                (f"val mIoU fell {100 * miou_fall:.1f}%", miou_falling)) if on)
            train_drop = _relative_drop(train[0], train[-1])
            self._fire(new, OVERFITTING, step, epoch,
                       f"{what} over {k} epochs while the train loss fell {100 * train_drop:.1f}%",
                       {"val_loss_start": val[0], "val_loss_now": val[-1], "val_miou_start": miou[0],
                        "val_miou_now": miou[-1], "train_loss_start": train[0], "train_loss_now": train[-1],
                        "best_val_miou": self._best_miou, "best_val_miou_epoch": self._best_miou_epoch,
                        "epochs": k}, stage=stage)

    # ------------------------------------------------------------------------- interventions
    def _update_early_stopping(self, epoch: int, signals: dict[str, float]) -> None:
        metric = self.cfg.early_stopping_metric
        key = metric if metric.startswith("val/") else f"val/{metric}"
        if key not in signals:
            return
        value = float(signals[key])
        higher = metric.removeprefix("val/") in HIGHER_IS_BETTER
        delta = self.cfg.early_stopping_min_delta
        improved = math.isfinite(value) and (
            self._es_best is None or (value > self._es_best + delta if higher else value < self._es_best - delta))
        if improved:
            self._es_best, self._es_best_epoch, self._es_bad_epochs = value, epoch, 0
        else:
            self._es_bad_epochs += 1

    def _refresh_stop(self) -> None:
        cfg = self.cfg
        by_detector = {f.detector: f for f in self.findings}
        if cfg.stop_on_diverged and DIVERGENCE in by_detector:
            f = by_detector[DIVERGENCE]
            self._stop = (True, f"diverged at step {f.step} (epoch {f.epoch}): {f.message}")
        elif cfg.stop_on_stuck and STUCK in by_detector:
            f = by_detector[STUCK]
            self._stop = (True, f"stuck at step {f.step} (epoch {f.epoch}): {f.message}")
        elif cfg.early_stopping_patience is not None and self._es_bad_epochs >= cfg.early_stopping_patience:
            metric = cfg.early_stopping_metric.removeprefix("val/")
            best = "none" if self._es_best is None else f"{self._es_best:.4g} at epoch {self._es_best_epoch}"
            self._stop = (True, f"early stopping: val/{metric} has not improved for {self._es_bad_epochs} "
                                f"epochs (best {best})")
        else:
            self._stop = (False, "")

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (checkpoints load with ``weights_only=True``)."""
        return {
            "findings": [f.to_dict() for f in self.findings],
            "active": dict(self._active),
            "first_total": list(self._first_total), "first_cls": list(self._first_cls),
            "recent_total": list(self._recent_total), "recent_cls": list(self._recent_cls),
            "stuck_checked": self._stuck_checked,
            "ratio_samples": [[c, b] for c, b in self._ratio_samples],
            "grad_history": list(self._grad_median.values), "loss_history": list(self._loss_median.values),
            "grad_explode_run": self._grad_explode_run, "loss_explode_run": self._loss_explode_run,
            "nonfinite_grad_run": self._nonfinite_grad_run,
            "epochs": [dict(r) for r in self._epochs],
            "first_epoch_cls": self._first_epoch_cls, "peak_pred_per_image": self._peak_pred_per_image,
            "best_miou": self._best_miou, "best_miou_epoch": self._best_miou_epoch,
            "es_best": self._es_best, "es_best_epoch": self._es_best_epoch, "es_bad_epochs": self._es_bad_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; an empty dict (older checkpoint) leaves the fresh state."""
        if not state:
            return
        self._reset_windows()
        self.findings = [Finding.from_dict(d) for d in state.get("findings", [])]
        self._active.update({k: bool(v) for k, v in state.get("active", {}).items() if k in self._active})
        self._first_total = list(state.get("first_total", []))[: self.loss_window]
        self._first_cls = list(state.get("first_cls", []))[: self.loss_window]
        self._recent_total.extend(state.get("recent_total", []))
        self._recent_cls.extend(state.get("recent_cls", []))
        self._stuck_checked = bool(state.get("stuck_checked", False))
        self._ratio_samples.extend((float(c), float(b)) for c, b in state.get("ratio_samples", []))
        self._grad_median = _RollingMedian(self.cfg.diverge_window, state.get("grad_history", []))
        self._loss_median = _RollingMedian(self.cfg.diverge_window, state.get("loss_history", []))
        self._grad_explode_run = int(state.get("grad_explode_run", 0))
        self._loss_explode_run = int(state.get("loss_explode_run", 0))
        self._nonfinite_grad_run = int(state.get("nonfinite_grad_run", 0))
        self._epochs.extend(dict(r) for r in state.get("epochs", []))
        self._first_epoch_cls = float(state.get("first_epoch_cls", math.nan))
        self._peak_pred_per_image = float(state.get("peak_pred_per_image", math.nan))
        self._best_miou = float(state.get("best_miou", math.nan))
        self._best_miou_epoch = int(state.get("best_miou_epoch", 0))
        self._es_best = state.get("es_best")
        self._es_best_epoch = int(state.get("es_best_epoch", 0))
        self._es_bad_epochs = int(state.get("es_bad_epochs", 0))
        self._refresh_stop()
