"""Published rule-based training-failure detectors, replayed on a detlab run's recorded signals.

Their known answers on synthetic traces are tests: ``python -m pytest tests/test_diagnosis_baselines.py``.

``benchmarks/diagnosis/bench_diagnosis.py`` compares detlab's diagnosis (``detlab.diagnosis``) with these tools by
replaying what each training run recorded; nothing is retrained. Each baseline is a function
``name(steps, epochs, total_steps) -> Optional[Alarm]`` returning the FIRST alarm the tool would have
raised (its step; for an epoch-level rule the epoch row's ``step``, i.e. optimiser steps done), or
``None``. ``BASELINES`` maps names to functions; ``replay_all`` runs them all. Inputs:

- ``steps``: one dict per optimiser step (``step`` 0-based, ``epoch`` 1-based, ``loss_total``,
  ``loss_cls``, ``loss_box``, ``lr``, ``grad_norm`` (may be missing on a non-finite-loss step),
  ``grad_norm_cls`` / ``grad_norm_box`` / ``grad_dead_share`` on sampled steps, and there the
  benchmark recorder's ``grad_norm_first_layer`` / ``grad_norm_last_layer`` / ``grad_zero_share``);
- ``epochs``: metrics.csv rows (``epoch``, ``step`` = steps done, ``train/loss_total``,
  ``val/loss_total``, ``val/ap50``, ...);
- ``total_steps``: the planned optimiser steps.

Values may be nan / inf / missing / None: no baseline raises on them.

Sources (the rules and every default below are taken from these; where the source leaves a choice
open, the choice is named at the rule):

1. AUTOTRAINER -- X. Zhang, J. Zhai, S. Ma, C. Shen, "AUTOTRAINER: An Automatic DNN Training Problem
   Detection and Repair System", ICSE 2021. Code: https://github.com/shiningrain/AUTOTRAINER at the
   ICSE-era commit aafa2a4 (2021-03-06, the commit that adds the paper PDF):
   ``AutoTrainer/utils/monitor.py`` (``IssueMonitor.determine``, ``loss_issue``, ``ol_judge``,
   ``max_delta_acc``, ``gradient_issue``), ``AutoTrainer/utils/utils.py`` (``default_param``,
   ``LossHistory.on_epoch_end``: check every ``checkgap`` epochs), ``AutoTrainer/utils/modules.py``
   (``problem_evaluation`` priorities). Defaults (paper Sec. V "parameter sensitivity" and
   ``default_param``): beta_1=1e-3, beta_2=1e-4 (vanishing), beta_3=70 (exploding), gamma=0.7 (dying
   ReLU), zeta=0.03, eta=0.2 (oscillating), delta=0.01 (slow convergence), Theta=0.7 (satisfied
   accuracy; ``reproduce.py`` passes 0.6), judgment_point=0.3, check every 3 epochs (paper: "By
   default, AUTOTRAINER checks the problem every 3 iterations"; ``model_train(checktype='epoch_3')``).
   The 2022+ commits of that repository (``monitor.py`` with ``check_large_loss`` at 1e3, ``and``
   instead of ``or`` in the convergence test) are a later extension and are NOT used here.
2. Amazon SageMaker Debugger built-in rules ``LossNotDecreasing`` and ``Overfit``. The rule code
   itself is closed source (it was removed from the public smdebug repository in "Remove 1P rules
   (#406)", awslabs/sagemaker-debugger commit bb14a44, 2019); parameters and defaults are from
   "List of Debugger built-in rules", https://docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html
   (mirrored in awsdocs/amazon-sagemaker-developer-guide, doc_source/debugger-built-in-rules.md,
   commit a869fa5), and the collection defaults from awslabs/sagemaker-debugger-rulesconfig
   ``smdebug_rulesconfig/debugger_rules/rule_config_jsons/ruleConfigs.json`` (LossNotDecreasing saves
   the ``losses`` collection with ``save_interval=500``). Saved steps follow smdebug's
   ``SaveConfigMode.should_save_step`` (``step % save_interval == 0``; smdebug/core/save_config.py).
3. Lightning ``EarlyStopping`` -- Lightning-AI/pytorch-lightning
   ``src/lightning/pytorch/callbacks/early_stopping.py`` (``_evaluate_stopping_criteria``): defaults
   ``min_delta=0.0, patience=3, mode="min", check_finite=True``; ``divergence_threshold`` has no
   default and is set here to 10x the first finite validation loss of the run (see the function).
4. The check every training framework ships: stop at a non-finite loss. torchvision's detection
   reference (``references/detection/engine.py``, ``train_one_epoch``): ``if not
   math.isfinite(loss_value): print(...); sys.exit(1)``, on every step's reduced total loss.

Scaled to the run (``scaled_settings``, what ``benchmarks/diagnosis/bench_diagnosis.py`` replays; the
spec's ``baselines.settings`` says the same in words): each tool gets the signals it records at the
granularity its rules assume. SageMaker saves the loss every ``SAGEMAKER_SAVE_FRACTION`` of the run (its
500-step default is that fraction of a 10,000-step job; at 500 a 375-step run keeps step 0 only), with
``num_steps`` at most that interval, so consecutive saves are compared as at the defaults. Lightning
counts its patience (3) in validations, one per epoch as detlab validates. AUTOTRAINER checks every 3
epochs (its own period) and its gradient rules read the recorded gradient samples. torchvision's check
runs on every step. The defaults of each function stay the tools' own (the tests check both).

Runs that diverged. detlab ends a run at its first non-finite loss, so the record stops there and
the epoch in progress never gets a metrics row. The tools replayed here were built for loops that
keep going, where a NaN update poisons the weights and every later loss and metric is NaN too. By
default (``extrapolate=True``) a record whose last step has a non-finite loss is therefore continued
to ``total_steps`` with NaN step losses / gradient norms and NaN epoch rows (epoch length taken from
the completed epochs; if none completed, the epoch in progress is taken to end at the divergence,
which favours the baselines). An alarm that lies past the recorded steps has ``extrapolated=True``
and says so in its message. ``extrapolate=False`` replays the record strictly.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Alarm:
    """The first alarm one baseline raises on a run."""

    baseline: str
    rule: str  # the spec maps "<baseline>.<rule>" to the fault classes it names (spec.yaml, baselines.rules)
    step: int  # optimiser step (per-step rules) or the epoch row's ``step`` = steps done (epoch rules)
    message: str
    extrapolated: bool = False  # the alarm lies past the recorded steps (see the module docstring)


# ----------------------------------------------------------------------------------- helpers
def _f(value: Any) -> float:
    """A float, nan for None / missing / unparsable values (never raises)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _int(value: Any, default: int = 0) -> int:
    v = _f(value)
    return int(v) if _finite(v) else default


def _pct(delta: float, base: float) -> float:
    """100 * delta / |base|; +inf for a non-zero delta over a zero base, 0 for 0/0."""
    if base == 0.0:
        return 0.0 if delta == 0.0 else math.inf
    return 100.0 * delta / abs(base)


def infer_steps_per_epoch(steps: Sequence[Record], epochs: Sequence[Record]) -> Optional[int]:
    """Optimiser steps per epoch: the most common step count of the epochs that finished (have a
    metrics row); else the most common difference of consecutive rows' ``step``; else None."""
    finished = {_int(r.get("epoch"), -1) for r in epochs}
    counts = Counter(_int(s.get("epoch"), -1) for s in steps)
    full = [counts[e] for e in finished if e >= 0 and counts.get(e)]
    if full:
        return Counter(full).most_common(1)[0][0]
    marks = sorted(_int(r.get("step"), -1) for r in epochs if _int(r.get("step"), -1) >= 0)
    diffs = [b - a for a, b in zip([0, *marks], marks) if b > a]
    return Counter(diffs).most_common(1)[0][0] if diffs else None


@dataclass
class _Trace:
    steps: list[dict[str, Any]]  # sorted by step
    epochs: list[dict[str, Any]]  # sorted by epoch
    total_steps: int
    steps_per_epoch: Optional[int]
    last_recorded_step: int  # -1 when nothing was recorded
    extended: bool  # steps / epochs past the record were synthesised (a diverged run)


_NAN_STEP_KEYS = ("loss_total", "loss_cls", "loss_box", "lr", "grad_norm")


def _prepare(steps: Sequence[Record], epochs: Sequence[Record], total_steps: Any,
             steps_per_epoch: Optional[int], extrapolate: bool) -> _Trace:
    """Sorted copies of the record; a diverged record continued with NaN (module docstring)."""
    st = sorted((dict(s) for s in steps if _finite(_f(s.get("step")))), key=lambda s: _int(s["step"]))
    ep = sorted((dict(r) for r in epochs), key=lambda r: (_int(r.get("epoch"), 0), _int(r.get("step"), 0)))
    total = _int(total_steps, 0)
    total = max(total, len(st))
    spe = steps_per_epoch if steps_per_epoch and steps_per_epoch > 0 else infer_steps_per_epoch(st, ep)
    last = _int(st[-1]["step"]) if st else -1
    trace = _Trace(st, ep, total, spe, last, extended=False)
    if not (extrapolate and st and not _finite(_f(st[-1].get("loss_total")))):
        return trace

    # The run diverged at step `last` of epoch `cur`: continue it with NaN to the planned end.
    cur = _int(st[-1].get("epoch"), 1)
    cur_start = min(_int(s["step"]) for s in st if _int(s.get("epoch"), 1) == cur)
    if spe:
        ends = [max(cur_start + spe, last + 1)]  # an epoch longer than usual still ends after the record
        while ends[-1] < total:
            ends.append(ends[-1] + spe)
    else:
        ends = [last + 1]  # unknown epoch length: the epoch in progress ends at the divergence
    epoch_of_step = [(end, cur + k) for k, end in enumerate(ends)]
    for s in range(last + 1, ends[-1]):
        e = next(ep_ for end, ep_ in epoch_of_step if s < end)
        st.append({"step": s, "epoch": e, **dict.fromkeys(_NAN_STEP_KEYS, math.nan)})
    row_keys = {k for r in ep for k in r} | {"train/loss_total", "train/loss_cls", "train/loss_box",
                                              "val/loss_total", "val/loss_cls", "val/loss_box", "val/ap50",
                                              "val/recall", "val/precision", "val/miou"}
    row_keys -= {"epoch", "step"}
    have_rows = {_int(r.get("epoch"), -1) for r in ep}
    for end, e in epoch_of_step:
        if e not in have_rows:
            ep.append({"epoch": e, "step": end, **dict.fromkeys(sorted(row_keys), math.nan)})
    trace.extended = True
    return trace


def _finish(alarm: Optional[Alarm], trace: _Trace) -> Optional[Alarm]:
    """Mark an alarm past the recorded steps as extrapolated."""
    if alarm is None or not trace.extended or alarm.step <= trace.last_recorded_step:
        return alarm
    return replace(alarm, extrapolated=True,
                   message=f"{alarm.message} [extrapolated: the record ends with a non-finite loss at step "
                           f"{trace.last_recorded_step}; NaN assumed to persist]")


# ---------------------------------------------------------------------------------- AUTOTRAINER
# IssueMonitor parameters (AutoTrainer/utils/utils.py default_param; paper Sec. V) and the
# LossHistory / loss_issue keyword defaults (AutoTrainer/utils/monitor.py).
AUTOTRAINER_DEFAULTS: dict[str, float] = {
    "beta_1": 1e-3,  # vanishing: |G_first| / |G_last| below this ...   (grad_norm_first_layer / _last_layer)
    "beta_2": 1e-4,  # ... and |G_first| below this
    "beta_3": 70.0,  # exploding: |G_first| / |G_last| above this
    "gamma": 0.7,  # dying ReLU: share of exactly-zero gradient entries   (grad_zero_share, else grad_dead_share)
    "zeta": 0.03,  # oscillating: local max - local min of accuracy >= zeta ...
    "eta": 0.2,  # ... in at least eta * (epochs so far) pairs
    "delta": 0.01,  # slow convergence: largest epoch-to-epoch accuracy rise below delta
    "Theta": 0.7,  # satisfied accuracy: below it the run "has not converged"
    "judgment_point": 0.3,  # convergence symptoms are judged from 30% of the planned epochs on
    "large_loss": 1e5,  # a validation loss at or above this counts as a NaN loss (ICSE-era monitor.py)
    "check_every": 3,  # epochs between checks (checktype 'epoch_3'); a check when (epoch-1) % 3 == 0
}
# Priorities of AutoTrainer/utils/modules.py problem_evaluation: one issue is reported per check.
_AT_PRIORITY = {"exploding_gradient": 2, "vanishing_gradient": 2, "dying_relu": 2,
                "slow_convergence": 1, "oscillating_loss": 1}


def _at_max_delta(acc: Sequence[float]) -> float:
    """monitor.py ``max_delta_acc``: the largest rise between consecutive epochs (0 if none)."""
    best = 0.0
    for a, b in zip(acc, acc[1:]):
        if b - a > best:  # nan compares False, as in the original
            best = b - a
    return best


def _at_ol_judge(acc: Sequence[float], zeta: float, eta: float) -> bool:
    """monitor.py ``ol_judge``: interior local maxima / minima (ties count as both) paired by order;
    oscillating when ``maximum[i] - minimum[i] >= zeta`` for at least ``eta * len(acc)`` pairs."""
    maxima, minima = [], []
    for i in range(1, len(acc) - 1):
        if acc[i] - acc[i - 1] >= 0 and acc[i] - acc[i + 1] >= 0:
            maxima.append(acc[i])
        if acc[i] - acc[i - 1] <= 0 and acc[i] - acc[i + 1] <= 0:
            minima.append(acc[i])
    count = sum(1 for hi, lo in zip(maxima, minima) if hi - lo >= zeta)
    return count >= eta * len(acc)


def _at_gradient_issue(sample: Record, p: Mapping[str, float], feature: dict[str, Any],
                       why: dict[str, str]) -> None:
    """monitor.py ``gradient_issue`` on one recorded gradient sample: a NaN gradient, else the sticky
    vanish / explode / died counts (the first reason of each is kept for the alarm's message)."""
    step = _int(sample.get("step"), -1)
    first, last = sample.get("grad_norm_first_layer"), sample.get("grad_norm_last_layer")
    zero = sample.get("grad_zero_share", sample.get("grad_dead_share"))
    values = [_f(v) for v in (first, last, zero) if v is not None]
    if any(not _finite(v) for v in values):
        feature["nan_gradient"] = True
        return
    if first is not None and last is not None:
        g_first, g_last = _f(first), _f(last)
        with np.errstate(all="ignore"):
            rate = float(np.float64(g_first) / np.float64(g_last))  # x/0 = inf, 0/0 = nan (never compares)
        if rate < p["beta_1"] and g_first < p["beta_2"]:
            feature["vanish_gradient"] += 1
            why.setdefault("vanish_gradient", f"step {step}: |G_first|/|G_last| = {rate:.3g} < beta_1={p['beta_1']:g} "
                                              f"and |G_first| = {g_first:.3g} < beta_2={p['beta_2']:g}")
        if rate > p["beta_3"]:
            feature["explode_gradient"] += 1
            why.setdefault("explode_gradient", f"step {step}: |G_first|/|G_last| = {rate:.3g} > beta_3={p['beta_3']:g}")
    if zero is not None and _f(zero) >= p["gamma"]:
        feature["died_relu"] += 1
        which = "grad_zero_share" if "grad_zero_share" in sample else "grad_dead_share"
        why.setdefault("died_relu", f"step {step}: {which} = {_f(zero):.3g} >= gamma={p['gamma']:g}")


def autotrainer(steps: Sequence[Record], epochs: Sequence[Record], total_steps: int, *,
                acc_key: str = "val/ap50", steps_per_epoch: Optional[int] = None, extrapolate: bool = True,
                **params: float) -> Optional[Alarm]:
    """AUTOTRAINER's problem detector (ICSE 2021), replayed at its epoch checks.

    Faithful to ``IssueMonitor.determine`` of the ICSE-era code: at the end of every
    ``check_every``-th epoch (Keras ``epoch % checkgap == 0``, i.e. detlab epochs 1, 4, 7, ...) it
    updates sticky features from the history (train loss, accuracy, val loss, val accuracy) and the
    gradient of that moment, then reports the highest-priority issue, which stops training:

    - exploding gradient ('explode'): a NaN/inf anywhere in the train or val loss history, or the last
      val loss >= 1e5 (``loss_issue``'s ``nan_loss``), or a NaN/inf gradient (``nan_gradient``). The
      gradient, which AUTOTRAINER takes on the first training batch at the check, is approximated
      by the recorded ``grad_norm`` of the epoch's last step (missing on a non-finite-loss step: NaN).
      ``nan_weight`` is not recorded (a NaN weight gives a NaN loss, which is).
    - slow convergence ('not_converge'): past the judgment point (len(history) >= 0.3 * planned
      epochs), the largest epoch-to-epoch rise of both train and val accuracy is < delta.
    - oscillating loss ('unstable'): past the judgment point, ``ol_judge`` holds on the (train)
      accuracy -- and, as in ``determine``'s ``elif``, only while neither "not converged" (max train
      or val accuracy < Theta) nor "slow convergence" holds.

    Approximated / skipped:

    - accuracy: detlab records no accuracy; ``acc_key`` (default ``val/ap50``) stands for both the
      train accuracy (``history['acc']``, used by ``ol_judge``) and the val accuracy, since no
      train-set AP is recorded.
    - the gradient rules (``gradient_issue``, at every check, sticky counts): vanishing gradient
      (|G_first|/|G_last| < beta_1 and |G_first| < beta_2), exploding gradient (|G_first|/|G_last| >
      beta_3) and dying ReLU (share of zero gradient entries >= gamma) read the last gradient sample
      at or before the check's epoch end: ``grad_norm_first_layer`` / ``grad_norm_last_layer`` (the
      first and last trainable kernel's gradient norms, Keras's ``norm_kernel[0]`` / ``[-1]``) and
      ``grad_zero_share`` (entries of the trainable weights' gradients that are 0), which the benchmark's
      recorder adds on the steps that sample gradients. A record without them (a run recorded before)
      falls back to detlab's ``grad_dead_share`` for dying ReLU (weights by count whose gradient is
      absent or all zero, frozen weights included, which a Keras gradient list would not hold) and
      leaves the ratio rules out. As in ``determine``, these issues are reported only while "not
      converged" or "slow convergence" holds, ahead of slow convergence (priority 2).
    - the train loss per epoch is metrics.csv's ``train/loss_total`` (the epoch mean, as Keras's).
    """
    p = {**AUTOTRAINER_DEFAULTS, **params}
    tr = _prepare(steps, epochs, total_steps, steps_per_epoch, extrapolate)
    spe = tr.steps_per_epoch
    total_epoch = max(1, math.ceil(tr.total_steps / spe)) if spe else max(1, len(tr.epochs))
    check_every = max(1, int(p["check_every"]))
    last_of_epoch: dict[int, dict[str, Any]] = {}
    for s in tr.steps:
        last_of_epoch[_int(s.get("epoch"), -1)] = s

    samples = [s for s in tr.steps if "grad_zero_share" in s or "grad_dead_share" in s
               or "grad_norm_first_layer" in s]
    sample_epochs = [_int(s.get("epoch"), -1) for s in samples]

    train_loss: list[float] = []
    val_loss: list[float] = []
    acc: list[float] = []
    feature = {"nan_loss": False, "nan_gradient": False, "not_converge": False, "sc_accuracy": False,
               "unstable_loss": False, "died_relu": 0, "explode_gradient": 0, "vanish_gradient": 0}
    why_gradient: dict[str, str] = {}
    for row in tr.epochs:
        epoch = _int(row.get("epoch"), len(train_loss) + 1)
        if "train/loss_total" in row:
            train_loss.append(_f(row["train/loss_total"]))
        if "val/loss_total" in row:
            val_loss.append(_f(row["val/loss_total"]))
        acc.append(_f(row.get(acc_key)))
        if (epoch - 1) % check_every != 0:
            continue
        step = _int(row.get("step"), 0)
        # gradient_issue: NaN gradient at the check
        last = last_of_epoch.get(epoch)
        if last is not None:
            grad = last.get("grad_norm")
            if grad is None and not _finite(_f(last.get("loss_total"))):
                grad = math.nan
            if grad is not None and not _finite(_f(grad)):
                feature["nan_gradient"] = True
        # gradient_issue: the layer rules on the last gradient sample at or before this check
        at = bisect.bisect_right(sample_epochs, epoch) - 1
        if at >= 0:
            _at_gradient_issue(samples[at], p, feature, why_gradient)        # loss_issue (ICSE era): NaN loss, then convergence symptoms past the judgment point
        if (any(not _finite(v) for v in train_loss) or any(not _finite(v) for v in val_loss)
                or (val_loss and val_loss[-1] >= p["large_loss"])):
            feature["nan_loss"] = True
        elif train_loss and len(train_loss) >= p["judgment_point"] * total_epoch:
            if _at_ol_judge(acc, p["zeta"], p["eta"]):
                feature["unstable_loss"] = True
            finite_acc = [a for a in acc if _finite(a)]
            if not finite_acc or max(finite_acc) < p["Theta"]:  # max(test_acc) < Theta or max(train_acc) < Theta
                feature["not_converge"] = True
            if _at_max_delta(acc) < p["delta"]:  # both accuracies are the same series here
                feature["sc_accuracy"] = True
        # IssueMonitor.determine, then modules.filtered_issue (highest priority wins)
        issues: list[tuple[str, str]] = []
        if feature["nan_loss"] or feature["nan_gradient"]:
            why = "non-finite or >= 1e5 loss" if feature["nan_loss"] else "non-finite gradient norm"
            issues.append(("exploding_gradient", why))
        if feature["not_converge"] or feature["sc_accuracy"]:
            if feature["died_relu"] >= 1:
                issues.append(("dying_relu", why_gradient["died_relu"]))
            elif feature["explode_gradient"] >= 1:
                issues.append(("exploding_gradient", why_gradient["explode_gradient"]))
            elif feature["vanish_gradient"] >= 1:
                issues.append(("vanishing_gradient", why_gradient["vanish_gradient"]))
            elif feature["sc_accuracy"]:
                why = f"largest epoch-to-epoch rise of {acc_key} {_at_max_delta(acc):.4g} < delta={p['delta']:g}"
                issues.append(("slow_convergence", why))
        elif feature["unstable_loss"]:
            why = f"{acc_key} local max - min >= zeta={p['zeta']:g} in >= eta={p['eta']:g} of {len(acc)} epochs"
            issues.append(("oscillating_loss", why))
        if issues:
            rule, why = max(issues, key=lambda it: _AT_PRIORITY[it[0]])
            return _finish(Alarm("autotrainer", rule, step, f"epoch {epoch} check: {why}"), tr)
    return None


# --------------------------------------------------------------------- SageMaker Debugger rules
# LossNotDecreasing: num_steps, diff_percent, increase_threshold_percent, mode (GLOBAL) from the
# "List of Debugger built-in rules"; save_interval=500 is the rule's default collection config.
LOSS_NOT_DECREASING_DEFAULTS: dict[str, Any] = {"num_steps": 10, "diff_percent": 0.1,
                                                "increase_threshold_percent": 5.0, "save_interval": 500}
OVERFIT_DEFAULTS: dict[str, Any] = {"start_step": 0, "patience": 1, "ratio_threshold": 0.1}


def sagemaker_loss_not_decreasing(steps: Sequence[Record], epochs: Sequence[Record], total_steps: int, *,
                                  num_steps: int = 10, diff_percent: float = 0.1,
                                  increase_threshold_percent: Optional[float] = 5.0, save_interval: int = 500,
                                  steps_per_epoch: Optional[int] = None,
                                  extrapolate: bool = True) -> Optional[Alarm]:
    """SageMaker Debugger ``LossNotDecreasing`` on the per-step ``loss_total`` (mode GLOBAL).

    Documented behaviour: the loss is saved every ``save_interval`` steps (``step % 500 == 0``, the
    rule's default collection config); the rule is evaluated at a saved step ``s`` only once
    ``num_steps`` steps have passed since its last evaluation, and compares the loss at ``s`` with the
    loss at the newest saved step at least ``num_steps`` behind ``s``. It fires when the loss has not
    decreased by ``diff_percent`` percent (default 0.1).

    ``increase_threshold_percent`` (default 5) is documented only as "the maximum threshold percent
    that loss is allowed to increase in case loss has been increasing"; the rule's code is not
    public. Read here as: when the loss went UP, the rule fires only if it rose by more than this
    percentage (a smaller rise is tolerated as noise); when it went down or stayed equal, it fires if
    it fell by less than ``diff_percent``. So an exactly flat loss fires and a slowly rising one (< 5%
    per comparison) does not. ``increase_threshold_percent=None`` gives the strict reading (any
    comparison without a ``diff_percent`` decrease fires). A non-finite current loss fires (it has
    not decreased); a non-finite reference loss with a finite current one does not.
    """
    tr = _prepare(steps, epochs, total_steps, steps_per_epoch, extrapolate)
    interval = max(1, int(save_interval))
    saved = [(_int(s["step"]), _f(s.get("loss_total"))) for s in tr.steps if _int(s["step"]) % interval == 0]
    saved_steps = [s for s, _ in saved]
    last_eval: Optional[int] = None
    for idx, (s, cur) in enumerate(saved):
        if last_eval is not None and s < last_eval + num_steps:
            continue
        ref_idx = bisect.bisect_right(saved_steps, s - num_steps, 0, idx) - 1
        if ref_idx < 0:
            continue
        last_eval = s
        ref_step, prev = saved[ref_idx]
        if not _finite(cur):
            why = f"loss {cur} at step {s} is not finite (step {ref_step}: {prev:.4g})"
        elif not _finite(prev):
            continue
        elif cur > prev:
            rise = _pct(cur - prev, prev)
            limit = 0.0 if increase_threshold_percent is None else increase_threshold_percent
            if rise <= limit:
                continue
            why = f"loss rose {rise:.3g}% from {prev:.4g} (step {ref_step}) to {cur:.4g} (> {limit:g}%)"
        else:
            fall = _pct(prev - cur, prev)
            if fall >= diff_percent:
                continue
            why = (f"loss fell only {fall:.3g}% from {prev:.4g} (step {ref_step}) to {cur:.4g} "
                   f"(< diff_percent={diff_percent:g}%)")
        return _finish(Alarm("sagemaker_loss_not_decreasing", "loss_not_decreasing", s, why), tr)
    return None


def sagemaker_overfit(steps: Sequence[Record], epochs: Sequence[Record], total_steps: int, *,
                      start_step: int = 0, patience: int = 1, ratio_threshold: float = 0.1,
                      steps_per_epoch: Optional[int] = None, extrapolate: bool = True) -> Optional[Alarm]:
    """SageMaker Debugger ``Overfit``: ``(mean val loss - mean train loss) / mean train loss`` above
    ``ratio_threshold`` (0.1) for ``patience`` (1) evaluations from ``start_step`` (0) on.

    Replayed per epoch: ``val/loss_total`` (the mean over the val set) against ``train/loss_total``
    (the epoch's mean training loss), at the epoch row's ``step``. "Exceeded for a patience number of
    steps" is read as consecutive evaluations (immaterial at the default patience of 1). The ratio
    follows IEEE float semantics: a NaN ratio never exceeds the threshold, an infinite one does.
    """
    tr = _prepare(steps, epochs, total_steps, steps_per_epoch, extrapolate)
    count = 0
    for row in tr.epochs:
        step = _int(row.get("step"), 0)
        if step < start_step or "val/loss_total" not in row or "train/loss_total" not in row:
            continue
        train, val = _f(row["train/loss_total"]), _f(row["val/loss_total"])
        with np.errstate(all="ignore"):
            ratio = float((np.float64(val) - np.float64(train)) / np.float64(train))
        if ratio > ratio_threshold:
            count += 1
            if count >= patience:
                return _finish(Alarm("sagemaker_overfit", "overfit", step,
                                     f"epoch {_int(row.get('epoch'))}: (val {val:.4g} - train {train:.4g}) / train "
                                     f"= {ratio:.3g} > {ratio_threshold:g} for {count} evaluation(s)"), tr)
        else:
            count = 0
    return None


# ------------------------------------------------------------------------ Lightning EarlyStopping
LIGHTNING_DEFAULTS: dict[str, Any] = {"monitor": "val/loss_total", "mode": "min", "min_delta": 0.0,
                                      "patience": 3, "check_finite": True, "divergence_factor": 10.0}


def lightning_early_stopping(steps: Sequence[Record], epochs: Sequence[Record], total_steps: int, *,
                             monitor: str = "val/loss_total", min_delta: float = 0.0, patience: int = 3,
                             check_finite: bool = True, divergence_threshold: Optional[float] = None,
                             divergence_factor: Optional[float] = 10.0,
                             stopping_threshold: Optional[float] = None,
                             steps_per_epoch: Optional[int] = None, extrapolate: bool = True) -> Optional[Alarm]:
    """Lightning ``EarlyStopping(monitor="val/loss_total", mode="min", check_finite=True,
    divergence_threshold=..., patience=3, min_delta=0)``, one check per validation (epoch row).

    ``_evaluate_stopping_criteria`` order: non-finite monitor (``check_finite``) -> ``stopping_threshold``
    (None: off; it marks success, not a failure) -> ``divergence_threshold`` (monitor > threshold) ->
    improvement (``current - |min_delta| < best``, best starting at +inf; resets the wait count) ->
    otherwise ``wait_count += 1`` and a stop at ``wait_count >= patience`` ("patience").

    ``divergence_threshold``: Lightning needs a constant chosen before training; none fits every
    detlab model and loss weighting, so unless one is given it is fixed per run at
    ``divergence_factor`` (10) x the first finite value of the monitor (epoch 1's validation loss),
    i.e. "stop once the validation loss is ten times where it started". A monitor key missing from a
    row skips that check (Lightning's ``strict=True`` would raise instead).
    """
    tr = _prepare(steps, epochs, total_steps, steps_per_epoch, extrapolate)
    best = math.inf
    wait = 0
    threshold = divergence_threshold
    for row in tr.epochs:
        if monitor not in row:
            continue
        cur = _f(row[monitor])
        step = _int(row.get("step"), 0)
        where = f"epoch {_int(row.get('epoch'))}: {monitor} = {cur:.4g}"
        if threshold is None and divergence_factor is not None and _finite(cur):
            threshold = divergence_factor * cur
        alarm = None
        if check_finite and not _finite(cur):
            alarm = Alarm("lightning_early_stopping", "check_finite", step,
                          f"{where} is not finite (best {best:.4g})")
        elif stopping_threshold is not None and cur < stopping_threshold:
            alarm = Alarm("lightning_early_stopping", "stopping_threshold", step,
                          f"{where} < stopping_threshold {stopping_threshold:g}")
        elif threshold is not None and cur > threshold:  # monitor_op(-current, -divergence_threshold)
            alarm = Alarm("lightning_early_stopping", "divergence_threshold", step,
                          f"{where} > divergence_threshold {threshold:.4g}"
                          + (f" ({divergence_factor:g} x the first value)" if divergence_threshold is None else ""))
        elif cur - abs(min_delta) < best:  # torch.lt(current - min_delta, best_score), min_delta negated for min
            best, wait = cur, 0
        else:
            wait += 1
            if wait >= patience:
                alarm = Alarm("lightning_early_stopping", "patience", step,
                              f"{where}: stopped, no improvement in the last {wait} checks (best {best:.4g})")
        if alarm is not None:
            return _finish(alarm, tr)
    return None


# ------------------------------------------------------------------- torchvision's non-finite check
def torchvision_nonfinite_loss(steps: Sequence[Record], epochs: Sequence[Record], total_steps: int, *,
                               steps_per_epoch: Optional[int] = None, extrapolate: bool = True) -> Optional[Alarm]:
    """The first step whose total loss is not finite (torchvision's detection reference stops the run
    there: ``if not math.isfinite(loss_value): sys.exit(1)``). A missing loss is not checked; nothing
    is extrapolated (the check stops at the step it sees)."""
    for s in sorted(steps, key=lambda r: _int(r.get("step"), 0)):
        if "loss_total" not in s or s["loss_total"] is None:
            continue
        loss = _f(s["loss_total"])
        if not _finite(loss):
            return Alarm("torchvision_nonfinite_loss", "nonfinite_loss", _int(s.get("step"), 0),
                         f"loss {loss} at step {_int(s.get('step'), 0)} is not finite")
    return None


# ------------------------------------------------------------------------------------ registry
Baseline = Callable[..., Optional[Alarm]]
BASELINES: dict[str, Baseline] = {
    "autotrainer": autotrainer,
    "sagemaker_loss_not_decreasing": sagemaker_loss_not_decreasing,
    "sagemaker_overfit": sagemaker_overfit,
    "lightning_early_stopping": lightning_early_stopping,
    "torchvision_nonfinite_loss": torchvision_nonfinite_loss,
}

# SageMaker's losses collection saves every 500 steps; a job of 10,000 steps keeps 20 samples. Scaled: every
# 5% of the run (the spec, baselines.settings).
SAGEMAKER_SAVE_FRACTION = 0.05


def scaled_settings(total_steps: int) -> dict[str, dict[str, Any]]:
    """Each baseline's keyword arguments for a run of ``total_steps`` planned steps, at the granularity its
    rules assume (module docstring): SageMaker's save interval as a fraction of the run and ``num_steps``
    within it; Lightning's patience (3 validations), AUTOTRAINER's period (3 epochs) and torchvision's
    per-step check are the tools' own, since detlab validates once an epoch."""
    interval = max(1, int(round(SAGEMAKER_SAVE_FRACTION * max(int(total_steps), 1))))
    return {"autotrainer": {}, "sagemaker_loss_not_decreasing": {"save_interval": interval,
                                                                 "num_steps": min(10, interval)},
            "sagemaker_overfit": {}, "lightning_early_stopping": {}, "torchvision_nonfinite_loss": {}}


def replay_all(steps: Sequence[Record], epochs: Sequence[Record], total_steps: int, scaled: bool = False,
               **kwargs: Any) -> dict[str, Optional[Alarm]]:
    """Every baseline's first alarm on one run (``kwargs``: ``steps_per_epoch``, ``extrapolate``), at the
    tools' defaults, or with ``scaled`` at ``scaled_settings(total_steps)``."""
    settings = scaled_settings(total_steps) if scaled else {}
    return {name: fn(steps, epochs, total_steps, **{**settings.get(name, {}), **kwargs})
            for name, fn in BASELINES.items()}
