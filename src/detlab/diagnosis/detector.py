"""The detector protocol: what a failure-pattern detector declares, reads and returns.

A detector is a ``Detector`` subclass declaring

- ``name``: its id in findings and TensorBoard (``diagnosis/<name>``), and its config block
  ``diagnosis.<name>``;
- ``Config``: that block, a dataclass of its settings with their defaults (``DetectorConfig``'s
  ``enabled`` included), and ``checks``: its own validation of the block;
- ``level``: ``Level.STEP`` when its findings are dated by the step (a per-step signal), ``Level.EPOCH``
  when they judge a whole epoch (validation metrics);
- ``remedy`` (generic), ``cause`` and ``advice`` (the overrides to try for a given run), ``stop_reason``
  (a finding may stop the run when its block's ``stop`` is set) and ``failure`` (False: a note);
- ``needs``: the signals it cannot judge without (``Need``), so that a diagnosis of recorded curves
  (``detlab.diagnosis.offline``) runs it only where they were recorded and says why it skipped it
  otherwise; ``title``: its name in words (default: the name with spaces);
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


class StopReason(str, enum.Enum):
    DIVERGED = "diverged"
    STUCK = "stuck"


@dataclass
class DetectorConfig:
    """What every detector's block holds; a detector's ``Config`` adds its own settings."""

    enabled: bool = True  # false: the detector is not run (no findings, no scalar)


@dataclass(frozen=True)
class RunInfo:
    """What every detector may read: the diagnosis config, the stage boundaries and the run's length."""

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
    """A detector's verdict "the pattern holds now"; the first one of a run becomes its ``Finding``."""

    message: str
    evidence: dict[str, float]
    remedy: Optional[str] = None  # None: the detector's ``remedy``
    stage: Optional[str] = None  # None: the stage of the check


# None: no verdict (the scalar keeps its value); False: the pattern does not hold now; Alarm: it does.
Verdict = Union[Alarm, bool, None]


class Detector:
    """One failure pattern (see the module docstring). ``self.cfg`` is the detector's block."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # the name in words ("" at registration: the name with spaces)
    level: ClassVar[Level]
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    remedy: ClassVar[str] = ""  # generic, naming the usual config keys
    cause: ClassVar[str] = "the likely cause"  # why it happens, said before a run's own overrides
    stop_reason: ClassVar[Optional[StopReason]] = None  # stop the run when fired and ``cfg.stop``
    failure: ClassVar[bool] = True  # False: its findings are notes on a run that learns, not failures
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

    def check_step(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        """Per optimiser step: loss_cls, loss_box (unweighted), loss_total (weighted), lr, grad_norm,
        num_pos, neg_per_pos, face_coverage, empty_image_share; on sampled steps grad_norm_cls,
        grad_norm_box, grad_dead_share, input_mean, input_std; weights_ramping (1.0 while the adaptive
        loss weights ramp)."""
        return None

    def check_epoch(self, when: When, signals: Mapping[str, Any]) -> Verdict:
        """Per epoch: train/* means and val/* metrics."""
        return None

    def advice(self, config: RunConfig, alarm: Alarm) -> list[str]:
        """The overrides to try next for this run (``key=value``), none of which it already has."""
        return []

    def remedy_for(self, alarm: Alarm) -> str:
        """Without the run's config: the generic remedy. With it: the cause and the concrete overrides
        to try next, computed from that config and the evidence (never what the run already does)."""
        config = self.run.config
        if config is None:
            return alarm.remedy or self.remedy
        overrides = self.advice(config, alarm)
        if not overrides:
            return (f"{self.cause}; this run already has the usual fixes for it: check the data and anchors, "
                    "or train longer")
        return f"{self.cause}; for this run try: {' '.join(overrides)}"


def overrides_check_step(cls: type[Detector]) -> bool:
    return cls.check_step is not Detector.check_step


def overrides_check_epoch(cls: type[Detector]) -> bool:
    return cls.check_epoch is not Detector.check_epoch
