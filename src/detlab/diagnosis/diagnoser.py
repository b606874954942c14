"""``Diagnoser``: runs the detectors on the training loop's signals, keeps their findings, 0/1 scalars
and the stop status.

The detectors run in registration order (``detlab.diagnosis.registry``), those whose block is
enabled. A detector never fires twice in a run (the finding records the onset), but a note of it (an
alarm of severity note) does not hold back a later failure finding of it; its TensorBoard
scalar (``Diagnoser.scalars``) follows whether the condition holds now, so a cleared pattern shows.
A repair re-arms a detector, or stands it down for the rest of the run (``rearm``). Stages come from
``StageBoundaries``; an epoch finding takes the stage of the epoch's last step (``step - 1``, ``step`` =
steps done).

A finding says, in plain words, what was seen (its evidence with the numbers), why it happens and what
to do; given the run's config (``run_config``), what to do is the concrete overrides to try next with
their current values (``Detector.advice``), never one the run already has.

Nothing is written here: the training loop owns the console, TensorBoard and files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from detlab.diagnosis.detector import (
    AWAITS_FAILURE,
    Alarm,
    Detector,
    Rearm,
    RunInfo,
    Severity,
    StopReason,
    Verdict,
    When,
    overrides_check_epoch,
    overrides_check_step,
)
from detlab.diagnosis.presentation import finding_line
from detlab.diagnosis.registry import block_of, registered_detectors
from detlab.diagnosis.state import load_state, state_to_plain

if TYPE_CHECKING:
    from detlab.config import Config as RunConfig
    from detlab.schedule import StageBoundaries


log = logging.getLogger(__name__)


@dataclass
class Finding:
    """One detected pattern: where it fired, what was seen (``message``: the evidence in plain words;
    ``evidence``: its numbers), why it happens (``cause``) and what to do (``remedy``)."""

    detector: str
    stage: str  # early | mid | late
    step: int
    epoch: int
    message: str  # the evidence in plain words, with its numbers
    evidence: dict[str, float] = field(default_factory=dict)
    remedy: str = ""  # what to do
    severity: Severity = Severity.FAILURE  # NOTE: a note on a run that learns (under_confidence)
    cause: str = ""  # why it happens, in plain words
    title: str = ""  # the finding's name in plain words
    kind: str = ""  # which of the detector's variants fired ("killed" for dead gradients after too-large updates)

    @property
    def failure(self) -> bool:
        """A failure pattern (an alarm), not a note."""
        return self.severity is Severity.FAILURE

    def to_dict(self) -> dict[str, Any]:
        """Plain types for summary.json and checkpoints (non-finite evidence stays a float). ``severity``
        ("failure" or "note") and ``failure`` (its boolean, what the diagnosis benchmark reads) both."""
        return {"detector": self.detector, "kind": self.kind, "title": self.title,
                "severity": self.severity.value, "failure": self.failure, "stage": self.stage,
                "step": int(self.step), "epoch": int(self.epoch), "cause": self.cause, "message": self.message,
                "evidence": {k: float(v) for k, v in self.evidence.items()}, "remedy": self.remedy}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """A ``to_dict`` record; one written before findings had a severity, a cause and a title reads its
        severity from ``failure`` and leaves the words empty."""
        severity = data.get("severity") or (Severity.FAILURE if data.get("failure", True) else Severity.NOTE)
        return cls(detector=data["detector"], stage=data["stage"], step=int(data["step"]), epoch=int(data["epoch"]),
                   message=data["message"], evidence=dict(data["evidence"]), remedy=data["remedy"],
                   severity=Severity(severity), cause=data.get("cause", ""), title=data.get("title", ""),
                   kind=data.get("kind", ""))

    def console_line(self) -> str:
        """One line: the finding, when, its cause, its evidence and what to do (no internal key names)."""
        return finding_line(self.to_dict())


@dataclass(frozen=True)
class DiagnosisStatus:
    """Whether the run should stop, why, and a one-line message (empty when it goes on)."""

    stop: bool = False
    reason: Optional[StopReason] = None
    message: str = ""


class Diagnoser:
    """Runs the detectors on per-step and per-epoch signals; returns new ``Finding``s, keeps the
    per-detector scalars and the stop ``status``. ``cfg`` is the ``diagnosis`` config (a
    ``DiagnosisConfig``); ``detectors``: the registered ones by default."""

    def __init__(self, cfg: Any, stages: StageBoundaries, total_steps: int, steps_per_epoch: int,
                 detectors: Optional[Sequence[type[Detector]]] = None, run_config: Optional[RunConfig] = None) -> None:
        self.cfg = cfg
        self.stages = stages
        self.run = RunInfo(cfg, stages, int(total_steps), max(1, int(steps_per_epoch)), run_config)
        classes = registered_detectors() if detectors is None else detectors
        blocks = [(cls, block_of(cfg, cls)) for cls in classes]
        self.detectors = [cls(self.run, block) for cls, block in blocks if block.enabled]
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique: {names}")
        # only the detectors that override a check are called for it (the per-step loop stays short)
        self._step_detectors = [d for d in self.detectors if overrides_check_step(type(d))]
        self._epoch_detectors = [d for d in self.detectors if overrides_check_epoch(type(d))]
        self.findings: list[Finding] = []
        self._repaired: set[int] = set()  # indices in ``findings`` of patterns a repair has handled
        self._settled: set[int] = set()  # indices in ``findings`` of risks a repair answered (``Rearm.SETTLE``)
        self._stood_down: set[str] = set()  # detectors a repair stood down for the rest of the run
        self.broken: dict[str, str] = {}  # detectors whose check raised, with the error: off for the rest of the run
        self._active = dict.fromkeys(names, False)
        self._status = DiagnosisStatus()

    # ------------------------------------------------------------------------------ public API
    def samples_gradients(self, step: int) -> bool:
        """Whether the training step ``step`` samples the gradients (``RunInfo.samples_gradients``)."""
        return self.run.samples_gradients(step)

    def fired(self, detector: str) -> bool:
        return any(f.detector == detector for f in self.findings)

    def _open(self, detector: str, severity: Severity) -> bool:
        """A finding of ``detector`` at ``severity`` that no repair has handled (it stays quiet meanwhile)."""
        return any(f.detector == detector and f.severity is severity and i not in self._repaired
                   for i, f in enumerate(self.findings))

    def rearm(self, detector: str, how: Rearm = Rearm.AFRESH) -> None:
        """A repair changed the run under ``detector``. ``AFRESH``, ``FROM_BEFORE``: it handled the
        pattern (e.g. the divergence rollback) or made the detector's windows incomparable; its findings no
        longer stop the run, its state starts afresh (``FROM_BEFORE``: from what it last saw,
        ``Detector.rearmed_state``), and it may fire again (a new finding); a detector stood down earlier
        watches again. ``STAND_DOWN``: it stops watching for the rest of the run (its findings stay as
        they are), unless a later repair re-arms it. ``SETTLE``: a repair answered its risks (notes that await
        a failure): no failure confirms them any more, and it watches on as it was."""
        how = Rearm(how)
        if how is Rearm.SETTLE:  # its risks answered: no failure confirms them (``_confirmed``); it watches on
            self._settled.update(i for i, f in enumerate(self.findings) if f.detector == detector
                                 and not f.failure and f.evidence.get(AWAITS_FAILURE, 0.0) > 0)
            return
        for det in self.detectors:
            if det.name != detector:
                continue
            self._active[detector] = False
            if how is Rearm.STAND_DOWN:
                self._stood_down.add(detector)
                continue
            self._stood_down.discard(detector)
            self._repaired.update(i for i, f in enumerate(self.findings) if f.detector == detector)
            det.state = det.rearmed_state() if how is Rearm.FROM_BEFORE else det.new_state()
        self._refresh_status()

    def scalars(self) -> dict[str, float]:
        """One 0/1 value per detector run (does its condition hold now?), for ``diagnosis/<detector>``."""
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
        return self._apply(when, [(d, self._checked(d, d.check_step, when, signals)) for d in self._step_detectors
                                  if d.name not in self._stood_down and d.name not in self.broken])

    def observe_epoch(self, epoch: int, step: int, signals: Mapping[str, Any]) -> list[Finding]:
        """Epoch-end signals (train/* means, val/* metrics); ``step`` = optimiser steps done so far.
        Returns only the findings new at this epoch."""
        if not self.cfg.enabled:
            return []
        when = When(int(step), int(epoch), self.stages.stage(max(step - 1, 0)))
        return self._apply(when, [(d, self._checked(d, d.check_epoch, when, signals)) for d in self._epoch_detectors
                                  if d.name not in self._stood_down and d.name not in self.broken])

    def _checked(self, det: Detector, check: Any, when: When, signals: Mapping[str, Any]) -> Verdict:
        """A detector's check; one that raises is switched off for the rest of the run with one warning, and
        the training it watches goes on (a fault of the diagnosis must never end a run)."""
        try:
            return check(when, signals)
        except Exception as error:  # noqa: BLE001 - any fault of a detector; the run is what matters
            self.broken[det.name] = f"{type(error).__name__}: {error}"
            log.warning("diagnosis: the %s check failed at step %d (%s); it is off for the rest of the run",
                        det.name, when.step, self.broken[det.name])
            self._active[det.name] = False
            return None

    def _apply(self, when: When, verdicts: list[tuple[Detector, Verdict]]) -> list[Finding]:
        """Scalars follow the verdicts; a detector's first alarm of the run becomes its finding."""
        new: list[Finding] = []
        for det, verdict in verdicts:
            if verdict is None:
                continue
            self._active[det.name] = verdict is not False
            if not isinstance(verdict, Alarm):
                continue
            severity = verdict.severity or det.severity
            if self._open(det.name, severity):
                continue
            finding = Finding(detector=det.name, stage=verdict.stage or when.stage, step=when.step,
                              epoch=when.epoch, message=verdict.message,
                              evidence={k: float(v) for k, v in verdict.evidence.items()},
                              remedy=det.remedy_for(verdict), severity=severity, cause=det.cause_for(verdict),
                              title=det.title_for(verdict), kind=verdict.kind)
            self.findings.append(finding)
            new.append(finding)
        if new:
            new = self._confirmed(new)
            self._refresh_status()
        return new

    def _confirmed(self, new: list[Finding]) -> list[Finding]:
        """``new`` with the notes that a failure confirms (``Detector.confirmers``) turned into failure findings
        of their detectors, each placed just before the confirming failure (a note older than it) or the note
        (a new note, confirmed by an older failure), in ``findings`` too: the note named the cause. A note is
        confirmed once, and not when its detector already has an open failure finding."""
        fresh = {id(f) for f in new}
        failures = [(i, f) for i, f in enumerate(self.findings) if f.failure and i not in self._repaired]
        if not failures:
            return new
        by_name = {d.name: d for d in self.detectors}
        before: dict[int, list[Finding]] = {}  # index in ``findings`` -> the confirmed findings placed before it
        done: set[str] = set()
        for i, note in enumerate(self.findings):
            det = by_name.get(note.detector)
            if (note.failure or i in self._repaired or i in self._settled or det is None or note.detector in done
                    or self._open(note.detector, Severity.FAILURE)):
                continue
            names = det.confirmers(note.kind, note.evidence)
            # a failure of this call confirms any open note; a new note is confirmed by an earlier failure too
            at = next(((j, f) for j, f in failures
                       if f.detector in names and (id(f) in fresh or id(note) in fresh)), None)
            if at is None:
                continue
            j, by = at
            alarm = Alarm(note.message, dict(note.evidence), kind=note.kind, severity=Severity.FAILURE)
            later = by if j > i else note
            before.setdefault(max(i, j), []).append(
                Finding(detector=note.detector, stage=later.stage, step=later.step, epoch=later.epoch,
                        message=f"{note.message} from step {note.step}; then {by.title or by.detector} "
                                f"at step {by.step}",
                        evidence={**note.evidence, "noted_at_step": float(note.step)},
                        remedy=det.remedy_for(alarm), severity=Severity.FAILURE, cause=det.cause_for(alarm),
                        title=det.title_for(alarm), kind=note.kind))
            done.add(note.detector)
            self._active[note.detector] = True
        if not before:
            return new
        findings: list[Finding] = []
        moved: dict[int, int] = {}  # old index -> new index (the repaired ones are kept by index)
        for j, f in enumerate(self.findings):
            findings += before.get(j, [])
            moved[j] = len(findings)
            findings.append(f)
        self.findings = findings
        self._repaired = {moved[i] for i in self._repaired}
        self._settled = {moved[i] for i in self._settled}
        added = {id(f) for found in before.values() for f in found}
        return [f for f in findings if id(f) in fresh or id(f) in added]

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
            "settled": sorted(self._settled),
            "stood_down": sorted(self._stood_down),
            "broken": dict(self.broken),
            "detectors": {d.name: state_to_plain(d.state) for d in self.detectors},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``. An empty dict (a checkpoint without diagnoser state) changes
        nothing; a detector the state lacks (added or switched on since) starts fresh."""
        if not state:
            return
        self.findings = [Finding.from_dict(data) for data in state["findings"]]
        self._repaired = {int(i) for i in state["repaired"]}
        self._settled = {int(i) for i in state.get("settled", ())}
        self._stood_down = {str(name) for name in state.get("stood_down", ()) if name in self._active}
        self.broken = {str(k): str(v) for k, v in state.get("broken", {}).items() if k in self._active}
        self._active.update({k: bool(v) for k, v in state["active"].items() if k in self._active})
        saved = state["detectors"]
        for det in self.detectors:
            det.state = load_state(det.new_state(), saved.get(det.name, {}))
        self._refresh_status()
