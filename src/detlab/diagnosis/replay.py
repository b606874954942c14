"""The findings the detectors give on a run's recorded signals, without training it again.

The training loop (``detlab.engine.trainer``) calls, epoch by epoch, ``Diagnoser.observe_step`` with
every step's signals and then ``Diagnoser.observe_epoch`` with the epoch's metrics row; with the repairs
on (``diagnosis.repair``), a repair re-arms the detectors it names. ``replay_findings`` makes the same
calls in the same order on recorded signals, re-arming where the run's recorded repairs did (the repairs
themselves changed the training, which the signals already hold), so the detectors can be checked (the
same findings at the same steps) and their thresholds tuned on recorded runs: replace
``config.diagnosis`` and replay.

Imported on its own (``detlab.diagnosis.replay``): the stage boundaries come from ``detlab.schedule``,
which sits above the config the package's schema feeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from detlab.diagnosis.detectors import DIVERGENCE
from detlab.diagnosis.diagnoser import Diagnoser, Finding
from detlab.diagnosis.repairs import Repairs, Rollback, rearm_plan
from detlab.schedule import stage_boundaries

# The step signals taken only on the steps that sample gradients (every ``diagnosis.grad_norm_every``).
SAMPLED_SIGNALS = ("grad_norm_cls", "grad_norm_box", "grad_dead_share", "input_mean", "input_std")

if TYPE_CHECKING:
    from detlab.config import Config
    from detlab.schedule import StageBoundaries


def replay_findings(config: Config, steps: Sequence[Mapping[str, Any]], epochs: Sequence[Mapping[str, Any]],
                    total_steps: int, advice: bool = True, stages: Optional[StageBoundaries] = None,
                    repaired: Optional[Sequence[Mapping[str, Any]]] = None,
                    sampled_every: Optional[int] = None) -> list[Finding]:
    """All findings of a run replayed: ``config`` is the run's (its ``diagnosis`` block decides),
    ``steps`` the per-step signals in order (``StepRecord.signals()`` with ``step`` and ``epoch``),
    ``epochs`` the per-epoch rows (metrics.csv: ``epoch``, ``step``, ``train/*``, ``val/*``) and
    ``total_steps`` the run's planned length. ``advice`` False: the remedies are the detectors'
    generic ones, not overrides computed from ``config`` (curves another training wrote). ``stages``:
    the stage boundaries in the replayed steps (default: from ``config``, as the training loop has them).
    ``repaired``: the repairs the run recorded (``summary.json``'s ``repairs``: repair, step, detector); the
    detectors are re-armed as they were after each, at its step (a replayed finding of its detector there,
    else the end of that step's epoch: other thresholds may date the finding elsewhere, but the signals
    after the step are the repaired run's). Without a record, a run with the rollback repair on has its
    divergences re-armed while rollbacks are left, as the training loop does. ``sampled_every``: the
    run's gradient-sampling interval when it was recorded (one for the whole run: ``grad_norm_every`` before
    version 2); when ``config`` samples at multiples of it (``grad_norm_every`` and
    ``grad_norm_every_first_part``), the sampled signals of the steps that it would not sample are dropped,
    so the replay sees what such a run would have measured (a non-multiple is refused: those samples were
    never taken). ``sampled_every`` is the recording's finest interval: a sample today's rule wants where the
    recording has none (a first part longer than the run's) stays missing."""
    steps_per_epoch = max(1, total_steps // config.train.epochs)
    if stages is None:
        stages = stage_boundaries(config.stages, config.schedule, total_steps, steps_per_epoch)
    diagnoser = Diagnoser(config.diagnosis, stages, total_steps, steps_per_epoch,
                          run_config=config if advice else None)
    if sampled_every is not None:
        intervals = {int(config.diagnosis.grad_norm_every), int(config.diagnosis.grad_norm_every_first_part)}
        if any(every % sampled_every for every in intervals):
            raise ValueError(f"diagnosis.grad_norm_every={config.diagnosis.grad_norm_every} and "
                             f"grad_norm_every_first_part={config.diagnosis.grad_norm_every_first_part} must be "
                             f"multiples of the recorded interval {sampled_every}: the replay cannot invent gradient "
                             "samples")
        steps = [s if diagnoser.samples_gradients(int(s["step"]))
                 else {k: v for k, v in s.items() if k not in SAMPLED_SIGNALS} for s in steps]
    rollback = Repairs(config.diagnosis).get(Rollback.name)
    rollbacks_left = rollback.cfg.max_rollbacks if rollback is not None else 0

    pending = sorted((dict(r) for r in repaired or ()), key=lambda r: int(r["step"]))

    def rearm_after(record: Mapping[str, Any]) -> None:
        plan = rearm_plan(str(record["repair"]), str(record["detector"]), bool(record.get("to_start", False)))
        for detector, how in plan:
            diagnoser.rearm(detector, how)

    def repair(new: list[Finding], step: int, epoch_end: bool = False) -> None:
        nonlocal rollbacks_left
        if repaired is not None:
            fired = {f.detector for f in new}
            for record in [r for r in pending if int(r["step"]) <= step]:
                if (int(record["step"]) == step and record["detector"] in fired) or epoch_end:
                    pending.remove(record)
                    rearm_after(record)
            return
        if rollbacks_left > 0 and any(f.detector == DIVERGENCE for f in new):
            rollbacks_left -= 1
            for detector, how in rearm_plan(Rollback.name, DIVERGENCE):
                diagnoser.rearm(detector, how)

    by_epoch: dict[int, list[Mapping[str, Any]]] = {}
    for signals in steps:
        by_epoch.setdefault(int(signals["epoch"]), []).append(signals)
    rows = {int(row["epoch"]): row for row in epochs}
    for epoch in sorted(by_epoch.keys() | rows.keys()):
        last = -1
        for signals in by_epoch.get(epoch, []):
            last = int(signals["step"])
            repair(diagnoser.observe_step(last, epoch, signals), last)
        if epoch in rows:
            last = int(rows[epoch]["step"])
            repair(diagnoser.observe_epoch(epoch, last, rows[epoch]), last)
        repair([], last, epoch_end=True)
    return diagnoser.findings
