"""Failure-pattern detectors for SSD training.

The paper's thesis: an imbalanced class/box loss-weight pair, missing hard negative mining or a
missing learning-rate warm-up make training fall into recognisable patterns. ``Diagnoser`` watches
the signals the training loop already has, names the pattern with its evidence and the paper's
suggested remedy (a ``Finding``), and says when the run should stop (``Diagnoser.status``).

Detectors (``DETECTORS``; each a small ``Detector`` class configured by ``diagnosis.<name>``):

- ``avoidance``: predictions per image collapse (< ``max_pred_per_image``) with recall near zero
  while ``loss_cls`` fell, and the ranking is near chance too (``val/ap50`` < ``max_ap50``): the model
  predicts only background. Epochs before the late stage.
- ``under_confidence``: in the late stage, ``val/ap50`` is well above chance (>= ``min_ap50``) but
  almost nothing scores above ``eval.score_threshold``: the model ranks faces and is under-confident.
  Its remedy (train longer, read at a lower threshold) differs from avoidance's.
- ``stuck``: mean total loss of the last loss window of the first part of training (the early
  stage, or the first ``min_fraction`` of the steps when longer) is not ``min_drop`` below the first
  window. Decided once, at the last step of that part; ``stuck.stop`` ends the run.
- ``loss_imbalance``: median of ``g_box / g_cls`` (gradient norms of the two weighted terms on the
  shared parameters, sampled every ``grad_norm_every`` steps) above ``ratio`` or below its inverse.
  Samples taken while the adaptive loss weights ramp (step signal ``weights_ramping`` > 0) are
  skipped: that imbalance is intended.
- ``random_large_boxes``: on epochs containing early steps, most predictions are large
  (``val/pred_large_share``) and precision is low.
- ``small_fp_explosion``: in the mid stage, ``val/fp`` rose for ``rise_epochs`` epochs, most false
  positives are small background detections (the TIDE breakdown's ``val/small/fp_background``) and
  ``train/loss_cls`` stagnates.
- ``overfitting``: after the early stage, ``val/loss_total`` rose (or ``val/miou`` fell) for
  ``epochs`` epochs while ``train/loss_total`` fell.
- ``divergence``: a non-finite (train or val) loss, ``nonfinite_grad_patience`` consecutive
  non-finite gradient norms (isolated ones are AMP overflows the scaler skips), or the gradient norm
  / raw loss above ``*_factor`` times its running median for ``patience`` consecutive steps;
  ``divergence.stop`` (on by default) ends the run, before a stuck stop.

A detector is a ``Detector`` subclass: ``name`` (also its config block), ``remedy``, a ``State``
dataclass holding everything it remembers, and ``check_step`` / ``check_epoch`` returning a verdict:
``None`` (nothing to say: its scalar keeps its value), ``False`` (the pattern does not hold now) or
an ``Alarm`` (message, evidence; it holds now). ``Diagnoser`` only loops over its detector classes
(``DEFAULT_DETECTORS``, in evaluation order), turns the first alarm of each into a ``Finding``,
keeps the 0/1 scalars and the stop status, and derives ``state_dict`` from the ``State`` fields.
Adding a detector: write the class, add its config block to ``DiagnosisConfig`` (and
``configs/diagnosis/default.yaml``) and its class to ``DEFAULT_DETECTORS``.

Remedies fit the run: given the run's config (``run_config``), a finding's remedy ends with the
concrete overrides to try next (``Detector.advice``), computed from that config and the evidence
(``loss.box_weight`` from the measured gradient-norm ratio, ``optim.lr`` from the run's), and never one
the run already has.

Re-arming: a detector never fires twice in a run (the finding records the onset); its TensorBoard
scalar (``Diagnoser.scalars``) follows whether the condition holds now, so a cleared pattern shows.
Stages come from ``StageBoundaries``; an epoch finding takes the stage of the epoch's last step
(``step - 1``, ``step`` = steps done).

All per-step work is O(1) amortised on Python floats (deques, a bisect-sorted median window); no
tensors are kept and nothing is written: the training loop owns the console, TensorBoard and files.
"""

from __future__ import annotations

import bisect
import enum
import math
import statistics
from collections import deque
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, ClassVar, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from detlab.config import Config, DiagnosisConfig
from detlab.schedule import StageBoundaries

EARLY, MID, LATE = "early", "mid", "late"

AVOIDANCE = "avoidance"
UNDER_CONFIDENCE = "under_confidence"
STUCK = "stuck"
IMBALANCE = "loss_imbalance"
LARGE_BOXES = "random_large_boxes"
SMALL_FP = "small_fp_explosion"
OVERFITTING = "overfitting"
DIVERGENCE = "divergence"
UNMATCHED_FACES = "unmatched_faces"
EMPTY_IMAGES = "empty_images"
DEAD_GRADIENTS = "dead_gradients"
UNNORMALISED_INPUT = "unnormalised_input"
DETECTORS = (AVOIDANCE, UNDER_CONFIDENCE, STUCK, IMBALANCE, LARGE_BOXES, SMALL_FP, OVERFITTING, DIVERGENCE,
             UNMATCHED_FACES, EMPTY_IMAGES, DEAD_GRADIENTS, UNNORMALISED_INPUT)


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
    failure: bool = True  # False: a note on a run that learns (under_confidence), not a failure pattern

    def to_dict(self) -> dict[str, Any]:
        """Plain types for summary.json and checkpoints (non-finite evidence stays a float)."""
        return {"detector": self.detector, "stage": self.stage, "step": int(self.step), "epoch": int(self.epoch),
                "message": self.message, "evidence": {k: float(v) for k, v in self.evidence.items()},
                "remedy": self.remedy, "failure": bool(self.failure)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Finding":
        return cls(detector=data["detector"], stage=data["stage"], step=int(data["step"]), epoch=int(data["epoch"]),
                   message=data["message"], evidence=dict(data["evidence"]), remedy=data["remedy"],
                   failure=bool(data["failure"]))

    def console_line(self) -> str:
        evidence = ", ".join(f"{k}={v:.4g}" for k, v in self.evidence.items())
        return (f"[diagnosis] {self.detector} ({self.stage} stage, epoch {self.epoch}, step {self.step}): "
                f"{self.message} [{evidence}] -> remedy: {self.remedy}")


class StopReason(str, enum.Enum):
    DIVERGED = "diverged"
    STUCK = "stuck"


@dataclass(frozen=True)
class DiagnosisStatus:
    """Whether the run should stop, why, and a one-line message (empty when it goes on)."""

    stop: bool = False
    reason: Optional[StopReason] = None
    message: str = ""


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


def _push_loss(value: Any, first: list[float], recent: deque[float]) -> None:
    """Keep the first ``recent.maxlen`` finite values of training and the most recent ones."""
    if is_finite_loss(value):
        if len(first) < recent.maxlen:
            first.append(float(value))
        recent.append(float(value))


def _record(signals: Mapping[str, Any], keys: Iterable[str]) -> dict[str, float]:
    return {key: float(signals.get(key, math.nan)) for key in keys}


# ---------------------------------------------------------------------------- detector protocol
@dataclass(frozen=True)
class RunInfo:
    """What every detector may read: the config, the stage boundaries and the run's length."""

    cfg: DiagnosisConfig
    stages: StageBoundaries
    total_steps: int
    steps_per_epoch: int
    config: Optional[Config] = None  # the run's whole config: remedies name the overrides it lacks

    @cached_property
    def first_part_end(self) -> int:
        """End of "the first part of training" (stuck decides at its last step): the early stage, or
        the first ``stuck.min_fraction`` of the steps when that is longer."""
        return max(self.stages.early_end, math.ceil(self.cfg.stuck.min_fraction * self.total_steps))

    @cached_property
    def loss_window(self) -> int:
        """Steps in the first and recent loss windows (stuck, avoidance); both fit the first part."""
        return max(1, min(self.cfg.loss_window, self.first_part_end // 2))


class When(NamedTuple):
    """Where a check runs: optimiser step, epoch and stage (an epoch check: steps done, stage of the last)."""

    step: int
    epoch: int
    stage: str


@dataclass(frozen=True)
class Alarm:
    """A detector's verdict "the pattern holds now"; the first one of a run becomes its ``Finding``."""

    message: str
    evidence: dict[str, float]
    remedy: Optional[str] = None  # None: the detector's ``remedy``
    stage: Optional[str] = None  # None: the stage of the check


# None: no verdict (the scalar keeps its value); False: the pattern does not hold now; Alarm: it does.
Verdict = Union[Alarm, bool, None]


class Detector:
    """One failure pattern. Subclasses set ``name``, ``remedy``, a ``State`` dataclass (deques,
    lists, ``_RollingMedian``, numbers and dicts of those: ``Diagnoser.state_dict`` turns them into
    plain types) and override ``check_step`` and/or ``check_epoch``. ``self.cfg`` is ``diagnosis.<name>``."""

    name: ClassVar[str] = ""
    remedy: ClassVar[str] = ""  # generic, naming the usual config keys
    cause: ClassVar[str] = "the likely cause"  # why it happens, said before a run's own overrides
    stop_reason: ClassVar[Optional[StopReason]] = None  # stop the run when fired and ``cfg.stop``
    failure: ClassVar[bool] = True  # False: its findings are notes on a run that learns, not failures

    @dataclass
    class State:
        """Nothing remembered."""

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        self.cfg = getattr(run.cfg, self.name, None)
        self.state = self.new_state()

    def new_state(self) -> Any:
        """A fresh state; override when its windows are sized by the config."""
        return self.State()

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        """Per optimiser step: loss_cls, loss_box (unweighted), loss_total (weighted), lr, grad_norm,
        num_pos; on sampled steps grad_norm_cls, grad_norm_box; weights_ramping (1.0 while the
        adaptive loss weights ramp)."""
        return None

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        """Per epoch: train/* means and val/* metrics."""
        return None

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        """The overrides to try next for this run (``key=value``), none of which it already has."""
        return []

    def remedy_for(self, alarm: "Alarm") -> str:
        """Without the run's config: the generic remedy. With it: the cause and the concrete overrides
        to try next, computed from that config and the evidence (never what the run already does)."""
        config = self.run.config
        if config is None:
            return alarm.remedy or self.remedy
        overrides = self.advice(config, alarm)
        if not overrides:
            return f"{self.cause}; this run already has the usual fixes for it: check the data and anchors, or train longer"
        return f"{self.cause}; for this run try: {' '.join(overrides)}"


# ---------------------------------------------------------------------------------- detectors
def missing_fixes(config: Config, *fixes: str) -> list[str]:
    """The overrides of the usual fixes named in ``fixes`` that the run does not have yet, in order."""
    table = {
        "mining": (config.loss.neg_pos_ratio > 0, "loss.neg_pos_ratio=3"),
        "warmup": (config.schedule.warmup, "schedule.warmup=true"),
        "clipping": (config.optim.grad_clip_norm is not None, "optim.grad_clip_norm=10"),
        "adaptive_weights": (config.loss.adaptive_weights.enabled, "loss.adaptive_weights.enabled=true"),
    }
    return [override for name in fixes for has, override in [table[name]] if not has]


class Divergence(Detector):
    name = DIVERGENCE
    cause = "the updates are too large for the loss surface"
    remedy = ("lower optim.lr, keep learning-rate warm-up, clip gradients (optim.grad_clip_norm), "
              "lower the largest loss weight")
    stop_reason = StopReason.DIVERGED

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        lo = config.loss
        out = [f"optim.lr={config.optim.lr / 10:.3g}", *missing_fixes(config, "clipping", "warmup")]
        if lo.box_weight > max(lo.class_weight, 1.0):
            out.append(f"loss.box_weight={max(lo.class_weight, 1.0):g}")
        return out

    @dataclass
    class State:
        loss_median: _RollingMedian  # raw loss (cls + box) of the last ``window`` finite steps
        grad_median: _RollingMedian  # finite gradient norms of the last ``window`` steps
        loss_explode_run: int = 0
        grad_explode_run: int = 0
        nonfinite_grad_run: int = 0

    def new_state(self) -> State:
        return self.State(_RollingMedian(self.cfg.window), _RollingMedian(self.cfg.window))

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        cfg, st = self.cfg, self.state
        loss_total = signals.get("loss_total", math.nan)
        parts = [signals[k] for k in ("loss_cls", "loss_box") if k in signals]
        raw = math.fsum(float(v) for v in parts) if parts else float(loss_total)
        lr = float(signals.get("lr", math.nan))
        if not (is_finite_loss(loss_total) and is_finite_loss(raw)):
            return Alarm("loss is not finite",
                         {"loss_total": float(loss_total), "loss_cls": float(signals.get("loss_cls", math.nan)),
                          "loss_box": float(signals.get("loss_box", math.nan)), "lr": lr})
        alarm = None
        median = st.loss_median.median()
        exploding = len(st.loss_median) >= cfg.min_history and raw > cfg.loss_factor * median
        st.loss_explode_run = st.loss_explode_run + 1 if exploding else 0
        st.loss_median.push(raw)
        if st.loss_explode_run >= cfg.patience:
            alarm = Alarm(f"raw loss {raw:.4g} is {raw / median:.3g}x its running median for "
                          f"{st.loss_explode_run} steps",
                          {"loss_raw": raw, "loss_median": median, "factor": raw / median,
                           "steps": st.loss_explode_run, "lr": lr})
        if "grad_norm" not in signals:
            return alarm
        grad = float(signals["grad_norm"])
        if not math.isfinite(grad):
            st.nonfinite_grad_run += 1
            if st.nonfinite_grad_run >= cfg.nonfinite_grad_patience:
                alarm = alarm or Alarm(f"gradient norm not finite for {st.nonfinite_grad_run} consecutive steps",
                                       {"grad_norm": grad, "steps": st.nonfinite_grad_run, "lr": lr})
            return alarm
        st.nonfinite_grad_run = 0
        median = st.grad_median.median()
        exploding = len(st.grad_median) >= cfg.min_history and grad > cfg.grad_factor * median
        st.grad_explode_run = st.grad_explode_run + 1 if exploding else 0
        st.grad_median.push(grad)
        if st.grad_explode_run >= cfg.patience:
            alarm = alarm or Alarm(f"gradient norm {grad:.4g} is {grad / median:.3g}x its running median for "
                                   f"{st.grad_explode_run} steps",
                                   {"grad_norm": grad, "grad_norm_median": median, "factor": grad / median,
                                    "steps": st.grad_explode_run, "lr": lr})
        return alarm

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        if "val/loss_total" in signals and not is_finite_loss(signals["val/loss_total"]):
            return Alarm("validation loss is not finite", {"val_loss_total": float(signals["val/loss_total"])})
        return None


class Avoidance(Detector):
    name = AVOIDANCE
    cause = "background anchors outweigh the faces in the classification loss, so predicting nothing is cheapest"
    remedy = ("use hard negative mining (loss.neg_pos_ratio=3) so background anchors cannot swamp the "
              "classification loss, add learning-rate warm-up, raise loss.class_weight relative to "
              "loss.box_weight, and check eval.score_threshold is not above the model's scores")

    @dataclass
    class State:
        first_cls: list[float] = field(default_factory=list)  # the first loss_window finite loss_cls
        recent_cls: deque[float] = field(default_factory=deque)  # the last loss_window
        first_epoch_cls: float = math.nan  # train/loss_cls of the first epoch (no step signals)
        peak_pred_per_image: float = math.nan
        previous_ap50: float = math.nan
        neg_per_pos: deque[float] = field(default_factory=deque)  # the last loss_window steps

    def new_state(self) -> State:
        return self.State(recent_cls=deque(maxlen=self.run.loss_window), neg_per_pos=deque(maxlen=self.run.loss_window))

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        """Before any validation: the classification term counts so many background anchors per face
        that predicting nothing is what its falling loss learns (the cause, seen while it happens)."""
        st, cfg = self.state, self.cfg
        _push_loss(signals.get("loss_cls"), st.first_cls, st.recent_cls)
        ratio = float(signals.get("neg_per_pos", math.nan))
        if not math.isfinite(ratio):
            return None
        st.neg_per_pos.append(ratio)
        if when.stage == LATE or len(st.neg_per_pos) < st.neg_per_pos.maxlen or len(st.first_cls) < st.recent_cls.maxlen:
            return None
        swamp = _mean(st.neg_per_pos)
        drop = _relative_drop(_mean(st.first_cls), _mean(st.recent_cls))
        if not (swamp > cfg.max_neg_per_pos and drop >= cfg.min_cls_drop):
            return None  # the epoch check decides whether the pattern holds
        return Alarm(f"the classification loss counts {swamp:.0f} background anchors per face anchor and fell "
                     f"{100 * drop:.0f}%: the model is learning to predict only background",
                     {"neg_per_pos": swamp, "max_neg_per_pos": cfg.max_neg_per_pos, "loss_cls_drop": drop,
                      "loss_cls_first": _mean(st.first_cls), "loss_cls_now": _mean(st.recent_cls)})

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        cfg, st = self.cfg, self.state
        if math.isnan(st.first_epoch_cls):
            st.first_epoch_cls = float(signals.get("train/loss_cls", math.nan))
        ppi = float(signals.get("val/pred_per_image", math.nan))
        if math.isfinite(ppi) and (math.isnan(st.peak_pred_per_image) or ppi > st.peak_pred_per_image):
            st.peak_pred_per_image = ppi
        if st.first_cls and st.recent_cls:
            cls_first, cls_now = _mean(st.first_cls), _mean(st.recent_cls)
        else:  # no step signals: compare epoch means with the first epoch's
            cls_first, cls_now = st.first_epoch_cls, float(signals.get("train/loss_cls", math.nan))
        drop = _relative_drop(cls_first, cls_now)
        recall = float(signals.get("val/recall", math.nan))
        ap50 = float(signals.get("val/ap50", 0.0))  # absent: no evidence of a ranking
        # A ranking still climbing out of chance is a run that learns, not one that avoids: measured,
        # healthy default runs read AP50 0.0006 then 0.03 in their first two epochs.
        rise, st.previous_ap50 = ap50 - st.previous_ap50, ap50
        if not (when.stage != LATE and ppi < cfg.max_pred_per_image and recall < cfg.max_recall
                and drop >= cfg.min_cls_drop and not ap50 >= cfg.max_ap50 and rise < cfg.min_ap50_rise):
            return False
        evidence = {"pred_per_image": ppi, "recall": recall, "ap50": ap50, "ap50_rise": rise, "loss_cls_first": cls_first,
                    "loss_cls_now": cls_now, "loss_cls_drop": drop, "peak_pred_per_image": st.peak_pred_per_image}
        if "val/mean_score" in signals:
            evidence["mean_score"] = float(signals["val/mean_score"])
        return Alarm(f"the model predicts only background: {ppi:.3g} boxes per image, recall {recall:.3g}, "
                     f"while loss_cls fell {100 * drop:.0f}%", evidence)

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        lo = config.loss
        out = missing_fixes(config, "mining", "warmup")
        if lo.box_weight > lo.class_weight:
            out.append(f"loss.box_weight={lo.class_weight:g}")
        return out + missing_fixes(config, "adaptive_weights")


class UnderConfidence(Detector):
    name = UNDER_CONFIDENCE
    failure = False  # the ranking is learnt: a note on how to read the threshold metrics, not a failure
    cause = "the ranking is learnt but the scores are not yet confident; rebalancing or warm-up will not help"
    remedy = ("the model ranks faces (AP50 well above chance) but scores them low: train longer, or read "
              "the metrics at a lower eval.score_threshold; rebalancing or warm-up will not help")

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        cfg = self.cfg
        ppi = float(signals.get("val/pred_per_image", math.nan))
        recall = float(signals.get("val/recall", math.nan))
        ap50 = float(signals.get("val/ap50", math.nan))
        if not (when.stage == LATE and ap50 >= cfg.min_ap50 and ppi < cfg.max_pred_per_image
                and recall < cfg.max_recall):
            return False
        evidence = {"ap50": ap50, "pred_per_image": ppi, "recall": recall}
        if "val/mean_score" in signals:
            evidence["mean_score"] = float(signals["val/mean_score"])
        return Alarm(f"AP50 is {ap50:.3g}, but only {ppi:.3g} boxes per image score above the threshold "
                     f"(recall {recall:.3g}): the ranking is learnt, the confidence is not", evidence)

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        return [f"train.epochs={2 * config.train.epochs}",
                f"eval.score_threshold={max(round(config.eval.score_threshold / 2, 2), 0.05):g}"]


class Stuck(Detector):
    name = STUCK
    cause = "the learning rate (or its warm-up) does not move the loss in the first part of training"
    remedy = ("add learning-rate warm-up (schedule.warmup=true) and check the learning rate; rebalance "
              "loss.class_weight / loss.box_weight")
    stop_reason = StopReason.STUCK

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        return [*missing_fixes(config, "warmup"), f"optim.lr={config.optim.lr * 3:.3g}",
                *missing_fixes(config, "mining")]

    @dataclass
    class State:
        first: list[float] = field(default_factory=list)  # the first loss_window finite loss_total
        recent: deque[float] = field(default_factory=deque)  # the last loss_window
        checked: bool = False

    def new_state(self) -> State:
        return self.State(recent=deque(maxlen=self.run.loss_window))

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        st, end = self.state, self.run.first_part_end
        _push_loss(signals.get("loss_total"), st.first, st.recent)
        if st.checked or end < 2 or when.step < end - 1:
            return None
        st.checked = True
        if not st.first or not st.recent:
            return None
        first, last = _mean(st.first), _mean(st.recent)
        drop = _relative_drop(first, last)
        if drop >= self.cfg.min_drop:  # a nan drop (first mean 0) counts as stuck too
            return False
        window = st.recent.maxlen
        return Alarm(f"total loss fell only {100 * drop:.1f}% over the first {end} steps "
                     f"({first:.4g} -> {last:.4g}, {window}-step windows)",
                     {"loss_first_window": first, "loss_last_window": last, "relative_drop": drop,
                      "min_drop": self.cfg.min_drop, "window_steps": window,
                      "lr": float(signals.get("lr", math.nan))})


class LossImbalance(Detector):
    name = IMBALANCE
    cause = "one weighted loss term dominates the gradient on the shared backbone"
    remedy = ("raise loss.class_weight or lower loss.box_weight until the two gradient norms are within a few "
              "times of each other, or emphasise classification early with loss.adaptive_weights.enabled=true")
    remedy_cls = ("raise loss.box_weight (or lower loss.class_weight) so localisation is learnt; "
                  "loss.adaptive_weights ramps the box weight up after the early stage")

    @dataclass
    class State:
        samples: deque[tuple[float, float]] = field(default_factory=deque)  # recent (g_cls, g_box)

    def new_state(self) -> State:
        return self.State(deque(maxlen=self.cfg.window))

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        if "grad_norm_cls" not in signals or "grad_norm_box" not in signals:
            return None
        g_cls, g_box = float(signals["grad_norm_cls"]), float(signals["grad_norm_box"])
        if not (math.isfinite(g_cls) and math.isfinite(g_box)) or (g_cls <= 0 and g_box <= 0):
            return None
        if signals.get("weights_ramping", 0.0) > 0:
            return None  # the adaptive loss weights emphasise classification on purpose
        samples = self.state.samples
        samples.append((g_cls, g_box))
        if len(samples) < self.cfg.min_samples:
            return None
        ratios = [b / c if c > 0 else math.inf for c, b in samples]
        ratio = statistics.median(ratios)
        threshold = self.cfg.ratio
        dominant = "box" if ratio > threshold else "cls" if ratio < 1.0 / threshold else None
        if dominant is None:
            return False
        factor = ratio if dominant == "box" else (1.0 / ratio if ratio > 0 else math.inf)
        term, other = ("box", "class") if dominant == "box" else ("class", "box")
        return Alarm(f"the {term} term dominates the update: its gradient norm on the shared parameters is "
                     f"{factor:.3g}x the {other} term's (median of {len(ratios)} samples)",
                     {"ratio_box_to_cls": ratio, "grad_norm_cls": statistics.median(c for c, _ in samples),
                      "grad_norm_box": statistics.median(b for _, b in samples),
                      "box_dominates": float(dominant == "box"), "threshold": threshold, "samples": len(ratios)},
                     remedy=self.remedy if dominant == "box" else self.remedy_cls)

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        ratio, box_dominates = alarm.evidence["ratio_box_to_cls"], alarm.evidence["box_dominates"] > 0
        box_weight = config.loss.box_weight
        out = []
        if math.isfinite(ratio) and ratio > 0 and box_weight > 0:
            # The box term's gradient scales with its weight: aim the ratio at 2 (or 1/2).
            target = 2.0 if box_dominates else 0.5
            out.append(f"loss.box_weight={box_weight * target / ratio:.2g}")
        elif not box_dominates and box_weight == 0:
            out.append("loss.box_weight=1")
        return out + (missing_fixes(config, "adaptive_weights") if box_dominates else [])


class RandomLargeBoxes(Detector):
    name = LARGE_BOXES
    cause = "boxes are regressed before the classifier knows faces"
    remedy = ("add learning-rate warm-up and emphasise classification early (lower box weight early, "
              "loss.adaptive_weights.enabled=true); check the anchor sizes match the faces")

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        cfg = self.cfg
        early_epoch = (when.epoch - 1) * self.run.steps_per_epoch < self.run.stages.early_end  # has early steps
        ppi = float(signals.get("val/pred_per_image", math.nan))
        share = float(signals.get("val/pred_large_share", math.nan))
        precision = float(signals.get("val/precision", math.nan))
        if not (early_epoch and ppi >= cfg.min_pred_per_image and share >= cfg.share
                and precision < cfg.max_precision):
            return False
        evidence = {"pred_large_share": share, "precision": precision, "pred_per_image": ppi,
                    "pred_mean_size": float(signals.get("val/pred_mean_size", math.nan))}
        fp = float(signals.get("val/fp", math.nan))
        for kind in ("background", "localisation"):  # the TIDE breakdown: random boxes miss faces outright
            if f"val/fp_{kind}" in signals and fp > 0:
                evidence[f"fp_{kind}_share"] = float(signals[f"val/fp_{kind}"]) / fp
        return Alarm(f"{100 * share:.0f}% of the predicted boxes are large with precision {precision:.3g}: "
                     f"boxes are placed at random before the classifier has learnt faces", evidence)

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        return [*missing_fixes(config, "warmup", "adaptive_weights"), f"optim.lr={config.optim.lr / 3:.3g}"]


class SmallFpExplosion(Detector):
    name = SMALL_FP
    cause = "the classifier fires on small background patches"
    remedy = ("strengthen hard negative mining (loss.neg_pos_ratio), tune (raise) the confidence threshold "
              "eval.score_threshold, raise loss.class_weight")
    KEYS = ("val/fp", "train/loss_cls")

    @dataclass
    class State:
        history: deque[dict[str, float]] = field(default_factory=deque)  # the last rise_epochs + 1 epochs

    def new_state(self) -> State:
        return self.State(deque(maxlen=self.cfg.rise_epochs + 1))

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        cfg, history, k = self.cfg, self.state.history, self.cfg.rise_epochs
        history.append(_record(signals, self.KEYS))
        if when.stage != MID or len(history) < k + 1:
            return False
        fps = [r["val/fp"] for r in history]
        cls = [r["train/loss_cls"] for r in history]
        growth = (fps[-1] - fps[0]) / max(fps[0], 1.0)
        # The TIDE breakdown says which small false positives are on background (not badly placed
        # or duplicate boxes on faces); without it, every small false positive counts.
        if "val/small/fp_background" in signals and fps[-1] > 0:
            small_share = float(signals["val/small/fp_background"]) / fps[-1]
        else:
            small_share = float(signals.get("val/fp_small_share", math.nan))
        cls_drop = _relative_drop(cls[0], cls[-1])
        if not (_strictly_increasing(fps) and growth >= cfg.min_growth and small_share >= cfg.small_share
                and cls_drop < cfg.cls_stagnation):
            return False
        return Alarm(f"false positives rose for {k} epochs ({fps[0]:.0f} -> {fps[-1]:.0f}), "
                     f"{100 * small_share:.0f}% of them small and on background, while loss_cls stagnates "
                     f"({100 * cls_drop:.1f}% change)",
                     {"fp_start": fps[0], "fp_now": fps[-1], "fp_growth": growth, "fp_small_share": small_share,
                      "loss_cls_start": cls[0], "loss_cls_now": cls[-1], "loss_cls_drop": cls_drop,
                      "precision": float(signals.get("val/precision", math.nan)), "epochs": k})

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        lo = config.loss
        out = [f"loss.neg_pos_ratio={3 if lo.neg_pos_ratio <= 0 else lo.neg_pos_ratio + 2:g}"]
        if config.eval.score_threshold < 0.9:
            out.append(f"eval.score_threshold={min(config.eval.score_threshold + 0.1, 0.9):.2g}")
        if lo.class_weight <= lo.box_weight:
            out.append(f"loss.class_weight={2 * max(lo.class_weight, 0.5):g}")
        return out


class Overfitting(Detector):
    name = OVERFITTING
    cause = "the model fits the training set at the expense of the val set"
    remedy = ("early stopping on val mIoU (early_stopping.patience; the best checkpoint is kept), "
              "stronger augmentation (dataset.augment.*), more weight decay or more data")
    KEYS = ("train/loss_total", "val/loss_total", "val/miou")

    @dataclass
    class State:
        history: deque[dict[str, float]] = field(default_factory=deque)  # the last epochs + 1 epochs
        best_miou: float = math.nan
        best_miou_epoch: int = 0

    def new_state(self) -> State:
        return self.State(deque(maxlen=self.cfg.epochs + 1))

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        cfg, st, k = self.cfg, self.state, self.cfg.epochs
        record = _record(signals, self.KEYS)
        st.history.append(record)
        miou = record["val/miou"]
        if math.isfinite(miou) and (math.isnan(st.best_miou) or miou > st.best_miou):
            st.best_miou, st.best_miou_epoch = miou, when.epoch
        if when.stage == EARLY or len(st.history) < k + 1:
            return False
        train = [r["train/loss_total"] for r in st.history]
        val = [r["val/loss_total"] for r in st.history]
        miou = [r["val/miou"] for r in st.history]
        val_rise = -_relative_drop(val[0], val[-1])
        miou_fall = _relative_drop(miou[0], miou[-1])
        val_rising = _strictly_increasing(val) and val_rise >= cfg.min_change
        miou_falling = _strictly_increasing(miou[::-1]) and miou_fall >= cfg.min_change
        if not (train[-1] < train[0] and (val_rising or miou_falling)):
            return False
        what = " and ".join(s for s, on in ((f"val loss rose {100 * val_rise:.1f}%", val_rising),
                                            (f"val mIoU fell {100 * miou_fall:.1f}%", miou_falling)) if on)
        train_drop = _relative_drop(train[0], train[-1])
        return Alarm(f"{what} over {k} epochs while the train loss fell {100 * train_drop:.1f}%",
                     {"val_loss_start": val[0], "val_loss_now": val[-1], "val_miou_start": miou[0],
                      "val_miou_now": miou[-1], "train_loss_start": train[0], "train_loss_now": train[-1],
                      "best_val_miou": st.best_miou, "best_val_miou_epoch": st.best_miou_epoch, "epochs": k})

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        out = [] if config.early_stopping.patience is not None else ["early_stopping.patience=3"]
        augment = config.dataset.augment
        for key in ("random_crop", "hflip", "photometric", "zoom_out"):
            if not getattr(augment, key):
                out.append(f"dataset.augment.{key}=true")
        out.append(f"optim.weight_decay={max(config.optim.weight_decay * 2, 5e-4):.2g}")
        return out


class _WindowMean(Detector):
    """A step signal's mean over the last ``cfg.window`` steps that have it, tested against a bound
    once the window is full (the data and gradient checks below)."""

    signal: ClassVar[str] = ""

    @dataclass
    class State:
        recent: deque[float] = field(default_factory=deque)

    def new_state(self) -> Any:
        return self.State(deque(maxlen=self.cfg.window))

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        value = float(signals.get(self.signal, math.nan))
        if not math.isfinite(value):
            return None
        self.state.recent.append(value)
        if len(self.state.recent) < self.state.recent.maxlen:
            return None
        return self.verdict(_mean(self.state.recent), signals)

    def verdict(self, mean: float, signals: Mapping[str, Any]) -> Union[Alarm, bool]:
        """``False`` or an ``Alarm`` for the window's mean."""
        raise NotImplementedError


class _ShareAbove(_WindowMean):
    """The window's mean share above ``cfg.max_share``."""

    what: ClassVar[str] = ""  # "<share> of ..." in the message
    unit: ClassVar[str] = "steps"

    def verdict(self, share: float, signals: Mapping[str, Any]) -> Union[Alarm, bool]:
        if share <= self.cfg.max_share:
            return False
        return Alarm(f"{100 * share:.0f}% of {self.what} (mean of the last {self.cfg.window} {self.unit})",
                     {self.signal: share, "max_share": self.cfg.max_share, self.unit: self.cfg.window})


class UnmatchedFaces(_WindowMean):
    name = UNMATCHED_FACES
    signal = "face_coverage"
    cause = ("most training faces have no anchor that fits them: the anchor sizes do not span the faces, or the "
             "boxes are not xyxy in input pixels (xywh, normalised, swapped)")
    remedy = ("check that the dataset gives boxes as xyxy in pixels and that model.min_sizes span the face sizes "
              "(python scripts/dataset_stats.py prints them)")

    def verdict(self, coverage: float, signals: Mapping[str, Any]) -> Union[Alarm, bool]:
        if coverage >= self.cfg.min_coverage:
            return False
        return Alarm(f"only {100 * coverage:.0f}% of the training faces have an anchor with IoU >= model.match_iou "
                     f"(mean of the last {self.cfg.window} steps): the anchors cannot learn the others",
                     {"face_coverage": coverage, "min_coverage": self.cfg.min_coverage, "steps": self.cfg.window})

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        # Square anchors of side s fit a face of side f at IoU (min/max)^2: the sizes that fit the
        # faces are for the dataset statistics to say, so the advice names the keys to check.
        return [f"model.match_iou={max(round(config.model.match_iou - 0.1, 2), 0.3):g} (only if the boxes are right)"]


class EmptyImages(_ShareAbove):
    name = EMPTY_IMAGES
    signal = "empty_image_share"
    what = "the training images have no face"
    cause = "most training images arrive without a face: the annotations were lost or not read (a data bug)"
    remedy = ("check the annotation file and the loader (python scripts/dataset_stats.py counts the faces per "
              "image); if the images are negatives on purpose, raise diagnosis.empty_images.max_share")

    def advice(self, config: Config, alarm: "Alarm") -> list[str]:
        return ["dataset.keep_empty=false"] if config.dataset.keep_empty else []


class DeadGradients(_ShareAbove):
    name = DEAD_GRADIENTS
    signal = "grad_dead_share"
    what = "the weights got no gradient"
    unit = "samples"
    cause = "most weights receive no gradient: layers are frozen, or the loss no longer reaches them"
    remedy = ("unfreeze the backbone (requires_grad) unless it is frozen on purpose with pretrained weights; "
              "check for dead activations")



class UnnormalisedInput(_WindowMean):
    name = UNNORMALISED_INPUT
    signal = "input_std"
    cause = "the network's input is not normalised (raw 0-255 pixels, or normalised twice)"
    remedy = "normalise the images as the data pipeline does (ImageNet mean and std) before the model"

    def verdict(self, std: float, signals: Mapping[str, Any]) -> Union[Alarm, bool]:
        mean = float(signals.get("input_mean", math.nan))
        cfg = self.cfg
        if cfg.min_std <= std <= cfg.max_std and not abs(mean) > cfg.max_abs_mean:
            return False
        return Alarm(f"the network's input has mean {mean:.3g} and standard deviation {std:.3g} (mean of the last "
                     f"{cfg.window} samples); normalised images have about 0 and 1",
                     {"input_mean": mean, "input_std": std, "max_std": cfg.max_std, "max_abs_mean": cfg.max_abs_mean})


# Evaluation order: divergence first (its finding precedes what a blow-up causes, and its stop
# precedes a stuck stop), then the order of DETECTORS.
DEFAULT_DETECTORS: tuple[type[Detector], ...] = (
    Divergence, UnnormalisedInput, UnmatchedFaces, EmptyImages, DeadGradients, Avoidance, UnderConfidence, Stuck, LossImbalance,
    RandomLargeBoxes, SmallFpExplosion, Overfitting)


# --------------------------------------------------------------------------------- state <-> plain
def _to_plain(value: Any) -> Any:
    """Deques, tuples and rolling medians become lists, recursively (``torch.load(weights_only=True)``)."""
    if isinstance(value, _RollingMedian):
        return [float(v) for v in value.values]
    if isinstance(value, (list, tuple, deque)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return value


def _from_plain(fresh: Any, data: Any) -> Any:
    """``data`` (``_to_plain`` output) shaped like ``fresh``, a fresh state field (its type, maxlen,
    size); a copy, so the loaded state shares no list or dict with ``data``."""
    if isinstance(fresh, (bool, int, float)):
        return type(fresh)(data)
    items = _to_plain(data)
    if isinstance(fresh, _RollingMedian):
        return _RollingMedian(fresh.size, [float(v) for v in items])
    if isinstance(fresh, deque):
        return deque(items, maxlen=fresh.maxlen)
    return items


def _load_state(fresh: Any, data: Mapping[str, Any]) -> Any:
    """``fresh`` with every field ``data`` holds; the fields it lacks stay fresh."""
    for f in fields(fresh):
        if f.name in data:
            setattr(fresh, f.name, _from_plain(getattr(fresh, f.name), data[f.name]))
    return fresh


# ---------------------------------------------------------------------------------- diagnoser
class Diagnoser:
    """Runs the detectors on per-step and per-epoch signals; returns new ``Finding``s, keeps the
    per-detector scalars and the stop ``status``."""

    def __init__(self, cfg: DiagnosisConfig, stages: StageBoundaries, total_steps: int, steps_per_epoch: int,
                 detectors: Sequence[type[Detector]] = DEFAULT_DETECTORS, run_config: Optional[Config] = None) -> None:
        self.cfg = cfg
        self.stages = stages
        self.run = RunInfo(cfg, stages, int(total_steps), max(1, int(steps_per_epoch)), run_config)
        self.detectors = [cls(self.run) for cls in detectors]
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique: {names}")
        # only the detectors that override a check are called for it (the per-step loop stays short)
        self._step_detectors = [d for d in self.detectors if type(d).check_step is not Detector.check_step]
        self._epoch_detectors = [d for d in self.detectors if type(d).check_epoch is not Detector.check_epoch]
        self.findings: list[Finding] = []
        self._repaired: set[int] = set()  # indices in ``findings`` of patterns a repair has handled
        self._active = dict.fromkeys(names, False)
        self._status = DiagnosisStatus()

    # ------------------------------------------------------------------------------ public API
    def fired(self, detector: str) -> bool:
        return any(f.detector == detector for f in self.findings)

    def _open(self, detector: str) -> bool:
        """A finding of ``detector`` that no repair has handled (the detector stays quiet meanwhile)."""
        return any(f.detector == detector and i not in self._repaired for i, f in enumerate(self.findings))

    def rearm(self, detector: str) -> None:
        """A repair handled ``detector``'s pattern (e.g. the divergence rollback): its findings no
        longer stop the run, its state starts afresh, and it may fire again (a new finding)."""
        self._repaired.update(i for i, f in enumerate(self.findings) if f.detector == detector)
        for det in self.detectors:
            if det.name == detector:
                det.state = det.new_state()
                self._active[detector] = False
        self._refresh_status()

    def scalars(self) -> dict[str, float]:
        """One 0/1 value per detector (does its condition hold now?), for ``diagnosis/<detector>``."""
        if not self.cfg.enabled:
            return {}
        return {name: float(active) for name, active in self._active.items()}

    @property
    def status(self) -> DiagnosisStatus:
        """Stop when divergence fired and ``divergence.stop``, else when stuck fired and ``stuck.stop``
        (in general: the first detector in evaluation order with a ``stop_reason``, fired, its block's
        ``stop`` set)."""
        return self._status

    def observe_step(self, step: int, epoch: int, signals: Mapping[str, Any]) -> list[Finding]:
        """Signals: see ``Detector.check_step``. Returns only the findings new at this step."""
        if not self.cfg.enabled:
            return []
        when = When(int(step), int(epoch), self.stages.stage(step))
        return self._apply(when, [(d, d.check_step(when, signals)) for d in self._step_detectors])

    def observe_epoch(self, epoch: int, step: int, signals: Mapping[str, Any]) -> list[Finding]:
        """Epoch-end signals (train/* means, val/* metrics); ``step`` = optimiser steps done so far.
        Returns only the findings new at this epoch."""
        if not self.cfg.enabled:
            return []
        when = When(int(step), int(epoch), self.stages.stage(max(step - 1, 0)))
        return self._apply(when, [(d, d.check_epoch(when, signals)) for d in self._epoch_detectors])

    def _apply(self, when: When, verdicts: list[tuple[Detector, Verdict]]) -> list[Finding]:
        """Scalars follow the verdicts; a detector's first alarm of the run becomes its finding."""
        new: list[Finding] = []
        for det, verdict in verdicts:
            if verdict is None:
                continue
            self._active[det.name] = verdict is not False
            if not isinstance(verdict, Alarm) or self._open(det.name):
                continue
            finding = Finding(detector=det.name, stage=verdict.stage or when.stage, step=when.step,
                              epoch=when.epoch, message=verdict.message,
                              evidence={k: float(v) for k, v in verdict.evidence.items()},
                              remedy=det.remedy_for(verdict), failure=det.failure)
            self.findings.append(finding)
            new.append(finding)
        if new:
            self._refresh_status()
        return new

    def _refresh_status(self) -> None:
        by_detector = {f.detector: f for i, f in enumerate(self.findings) if i not in self._repaired}
        for det in self.detectors:
            f = by_detector.get(det.name)
            if f is not None and det.stop_reason is not None and getattr(det.cfg, "stop", False):
                message = f"{det.stop_reason.value} at step {f.step} (epoch {f.epoch}): {f.message}"
                self._status = DiagnosisStatus(stop=True, reason=det.stop_reason, message=message)
                return
        self._status = DiagnosisStatus()

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (checkpoints load with ``weights_only=True``)."""
        return {
            "findings": [f.to_dict() for f in self.findings],
            "active": dict(self._active),
            "repaired": sorted(self._repaired),
            "detectors": {d.name: {f.name: _to_plain(getattr(d.state, f.name)) for f in fields(d.state)}
                          for d in self.detectors},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``. An empty dict (a checkpoint without diagnoser state) changes
        nothing; a detector the state lacks (added since) starts fresh."""
        if not state:
            return
        self.findings = [Finding.from_dict(data) for data in state["findings"]]
        self._repaired = {int(i) for i in state["repaired"]}
        self._active.update({k: bool(v) for k, v in state["active"].items() if k in self._active})
        saved = state["detectors"]
        for det in self.detectors:
            det.state = _load_state(det.new_state(), saved.get(det.name, {}))
        self._refresh_status()
