"""The detector protocol: what a failure-pattern detector declares, reads and returns.

A detector is a ``Detector`` subclass declaring

- ``name``: its id in findings and TensorBoard (``diagnosis/<name>``), and its config block
  ``diagnosis.<name>``;
- ``Config``: that block, a dataclass of its settings with their defaults (``DetectorConfig``'s
  ``enabled`` included), and ``checks``: its own validation of the block;
- ``level``: ``Level.STEP`` when its findings are dated by the step (a per-step signal), ``Level.EPOCH``
  when they judge a whole epoch (validation metrics);
- ``severity``: ``Severity.FAILURE`` (a failure pattern: logged at WARNING, an alarm) or
  ``Severity.NOTE`` (a note on a run that learns: logged at INFO);
- what a person reads, in plain words and in one place, the class: ``title`` (its name in words;
  default: the name with spaces), ``cause`` (why it happens), ``evidence_text`` (templates of what was
  seen, filled with the evidence's numbers by ``describe``), ``remedy`` (what to do when the run's
  config is unknown) and ``advice`` (what to do in this run: the overrides to try with their current
  values, never one the run already has); ``stop_reason`` (a finding may stop the run when its block's
  ``stop`` is set);
- ``needs``: the signals it cannot judge without (``Need``), so that a diagnosis of recorded curves
  (``detlab.diagnosis.offline``) runs it only where they were recorded and says why it skipped it
  otherwise;
- a ``State`` dataclass holding everything it remembers (what a checkpoint keeps), and
  ``check_step`` / ``check_epoch`` returning a ``Verdict``.

``register_detector`` (``detlab.diagnosis.registry``) adds the class to the diagnosis: its block
joins the config schema, its checks the validation, and the ``Diagnoser`` runs it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, NamedTuple, Optional, Union

if TYPE_CHECKING:
    from detlab.config import Config as RunConfig
    from detlab.schedule import StageBoundaries

EARLY, MID, LATE = "early", "mid", "late"


class Level(str, enum.Enum):
    """Where a detector's findings are dated: the step whose signals showed it, or the epoch."""

    STEP = "step"
    EPOCH = "epoch"


class Severity(str, enum.Enum):
    """What a finding is: a failure pattern (an alarm, logged at WARNING) or a note on a run that learns
    (logged at INFO; the diagnosis benchmark counts notes apart from the false alarms)."""

    FAILURE = "failure"
    NOTE = "note"


class StopReason(str, enum.Enum):
    DIVERGED = "diverged"
    STUCK = "stuck"


# The evidence key of a note that awaits a failure to confirm it (``Detector.confirmers``): a risk the run may
# still escape. A repair that ``answers_risks`` acts on it as on a failure (a correction that only works early).
AWAITS_FAILURE = "awaits_failure"


class Rearm(str, enum.Enum):
    """What a detector does after a repair changed the run (``Diagnoser.rearm``)."""

    AFRESH = "afresh"  # watches anew from the next step, as at the start of training
    FROM_BEFORE = "from_before"  # watches anew, comparing with what it last saw (``Detector.rearmed_state``)
    STAND_DOWN = "stand_down"  # stops watching for the rest of the run: what it compares no longer exists
    SETTLE = "settle"  # a repair answered its risk (a note that awaits a failure): no failure confirms that note


@dataclass
class DetectorConfig:
    """What every detector's block holds; a detector's ``Config`` adds its own settings."""

    enabled: bool = True  # false: the detector is not run (no findings, no scalar)


@dataclass(frozen=True)
class RunInfo:
    """What every detector may read: the diagnosis config, the stage boundaries (with the end of the
    learning-rate warm-up) and the run's length."""

    cfg: Any  # the ``diagnosis`` config, a ``DiagnosisConfig`` (built from the registry at import time)
    stages: StageBoundaries
    total_steps: int
    steps_per_epoch: int
    config: Optional[RunConfig] = None  # the run's whole config: remedies name the overrides it lacks

    @cached_property
    def first_part_end(self) -> int:
        """End of "the first part of training" (stuck decides at its last step): the early stage, or
        the first ``stuck.min_fraction`` of the steps when that is longer."""
        return max(self.stages.early_end, math.ceil(self.cfg.stuck.min_fraction * self.total_steps))

    def samples_gradients(self, step: int) -> bool:
        """Whether ``step`` samples the gradients (the loss terms' norms, the dead share, the input's
        statistics): every ``grad_norm_every_first_part`` steps in the first part of training, every
        ``grad_norm_every`` after. The training loop and the replay both ask here."""
        every = self.cfg.grad_norm_every_first_part if step < self.first_part_end else self.cfg.grad_norm_every
        return step % every == 0

    @cached_property
    def loss_window(self) -> int:
        """Steps in the first and recent loss windows (stuck, avoidance); both fit the first part."""
        return max(1, min(self.cfg.loss_window, self.first_part_end // 2))


@dataclass(frozen=True)
class Need:
    """What a detector cannot judge without: any one of ``signals`` (step signal names as
    ``check_step`` reads them, or metrics.csv columns as ``check_epoch`` reads them), said in words
    by ``what``. ``model``: only the training loop can measure it (gradients, anchor matching, the
    network's input), so a curve from another training never has it."""

    signals: tuple[str, ...]
    what: str
    model: bool = False


class When(NamedTuple):
    """Where a check runs: optimiser step, epoch and stage (an epoch check: steps done, stage of the last)."""

    step: int
    epoch: int
    stage: str


@dataclass(frozen=True)
class Alarm:
    """A detector's verdict "the pattern holds now"; the first one of a run becomes its ``Finding``.
    Built-in detectors make it with ``Detector.alarm``, which words the evidence (``describe``)."""

    message: str  # the evidence in plain words, with its numbers
    evidence: dict[str, float]
    remedy: Optional[str] = None  # None: the detector's ``remedy_for``
    stage: Optional[str] = None  # None: the stage of the check
    kind: str = ""  # which of the detector's variants fired (its ``evidence_text`` key)
    severity: Optional[Severity] = None  # None: the detector's ``severity``


# None: no verdict (the scalar keeps its value); False: the pattern does not hold now; Alarm: it does.
Verdict = Union[Alarm, bool, None]


class Detector:
    """One failure pattern (see the module docstring). ``self.cfg`` is the detector's block."""

    name: ClassVar[str] = ""
    level: ClassVar[Level]
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    severity: ClassVar[Severity] = Severity.FAILURE  # NOTE: its findings are notes on a run that learns
    title: ClassVar[str] = ""  # the name in words ("" at registration: the name with spaces)
    cause: ClassVar[str] = ""  # why the pattern happens, one sentence in plain words
    # What was seen, in plain words: one template per variant (``Alarm.kind``; "" for a detector with
    # one), filled with the evidence's numbers (``str.format``). No internal key names.
    evidence_text: ClassVar[Mapping[str, str]] = {}
    remedy: ClassVar[str] = ""  # what to do, without the run's config (the keys to change)
    stop_reason: ClassVar[Optional[StopReason]] = None  # stop the run when fired and ``cfg.stop``
    needs: ClassVar[tuple[Need, ...]] = ()  # all of them, each met by any one of its signals

    @dataclass
    class State:
        """Nothing remembered."""

    def __init__(self, run: RunInfo, cfg: DetectorConfig) -> None:
        self.run = run
        self.cfg = cfg
        self.state = self.new_state()

    @staticmethod
    def checks(cfg: Any) -> dict[str, tuple[bool, str]]:
        """Validation of the block: ``{field: (value is valid, what it must be)}``."""
        return {}

    def new_state(self) -> Any:
        """A fresh state; override when its windows are sized by the config."""
        return self.State()

    def rearmed_state(self) -> Any:
        """The state after a repair that left what this detector measures as it was (a new learning rate):
        by default a fresh one; a detector that compares windows may start from its last one."""
        return self.new_state()

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        """Per optimiser step: loss_cls, loss_box (unweighted), loss_total (weighted), lr, grad_norm,
        num_pos, neg_per_pos, face_coverage, empty_image_share; on sampled steps grad_norm_cls,
        grad_norm_box, grad_dead_share, input_mean, input_std; weights_ramping (1.0 while the adaptive
        loss weights ramp)."""
        return None

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        """Per epoch: train/* means and val/* metrics."""
        return None

    @classmethod
    def display_title(cls) -> str:
        """The finding's name in plain words."""
        return cls.title or cls.name.replace("_", " ")

    def describe(self, evidence: Mapping[str, float], kind: str = "") -> str:
        """The evidence in plain words: the ``evidence_text`` template of ``kind`` filled with its numbers."""
        return self.evidence_text[kind].format(**evidence)

    def alarm(self, evidence: Mapping[str, float], kind: str = "") -> Alarm:
        """An ``Alarm`` whose message is ``describe(evidence, kind)``."""
        return Alarm(self.describe(evidence, kind), {k: float(v) for k, v in evidence.items()}, kind=kind)

    def cause_for(self, alarm: Alarm) -> str:
        """Why the pattern happens (a detector with variants may say it per variant)."""
        return self.cause

    def title_for(self, alarm: Alarm) -> str:
        """The finding's name in words (a detector with variants may name one by its cause)."""
        return self.display_title()

    def advice(self, config: RunConfig, alarm: Alarm) -> list[str]:
        """What to do in this run, one instruction each in plain words, with the override to try and its
        current value (``raise the learning rate 10x: optim.lr=0.0001 (now 1e-05)``), never one the run
        already has; computed from the run's config and the evidence."""
        return []

    def confirmers(self, kind: str, evidence: Mapping[str, float]) -> tuple[str, ...]:
        """The detectors whose failure finding turns this detector's note (of variant ``kind``, with
        ``evidence``) into a failure finding of its own, dated at the confirming finding: a note that names a
        risk a run may still escape, until the failure it risks shows (``Diagnoser``). Default: none (a note
        stays a note)."""
        return ()

    def remedy_for(self, alarm: Alarm) -> str:
        """What to do: this run's ``advice`` (given the run's config), else the detector's own ``remedy``."""
        config = self.run.config
        steps = self.advice(config, alarm) if config is not None else []
        return "; ".join(steps) if steps else (alarm.remedy or self.remedy)


def overrides_check_step(cls: type[Detector]) -> bool:
    return cls.check_step is not Detector.check_step


def overrides_check_epoch(cls: type[Detector]) -> bool:
    return cls.check_epoch is not Detector.check_epoch
