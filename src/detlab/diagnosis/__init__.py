"""Failure-pattern detectors for SSD training: which pattern a run falls into, when, with what
evidence and remedy, and whether it should stop.

- ``detector``: the protocol a detector follows (``Detector``, its ``Config`` block and ``Level``,
  ``Alarm``, ``RunInfo``, ``When``).
- ``registry``: ``@register_detector``; from the registered classes come the config schema, its
  validation, the evaluation order and the step/epoch split (``step_level_detectors``).
- ``detectors``: the built-in detectors, one small class each.
- ``repairs``: what a run does about a finding while it trains (``diagnosis.repair``): ``@register_repair``,
  the built-in repairs (rollback, rebalance, raise_lr, mining) and ``Repairs``, the set a run has on.
- ``schema``: ``DiagnosisConfig``, the ``diagnosis`` config group's schema, and ``config_problems``.
- ``diagnoser``: ``Diagnoser`` (runs them on the training loop's signals), ``Finding``, ``DiagnosisStatus``.
- ``presentation``: how a finding reads (finding, when, cause, evidence, what to do), for the console,
  the sweep report and the results page.
- ``state``: detector states to plain types and back (checkpoints).
- ``windows``: rolling windows and small statistics on floats.
- ``replay`` (imported on its own): re-runs the detectors on a run's recorded signals.
- ``offline`` (imported on its own): the diagnosis of a finished run folder, a CSV or TensorBoard
  events from any training (``detlab diagnose``): curves in, a report out.

Adding a detector: one ``@register_detector`` class in ``detectors`` and its block in
``configs/diagnosis/default.yaml``; adding a repair: one ``@register_repair`` class in ``repairs`` and its
block under ``repairs:`` there.
"""

from detlab.diagnosis.detector import (
    AWAITS_FAILURE,
    Alarm,
    Detector,
    DetectorConfig,
    Level,
    Need,
    Rearm,
    RunInfo,
    Severity,
    StopReason,
    Verdict,
    When,
)
from detlab.diagnosis.detectors import DIVERGENCE, Divergence
from detlab.diagnosis.diagnoser import Diagnoser, DiagnosisStatus, Finding
from detlab.diagnosis.presentation import (
    FINDING_HEADER,
    finding_columns,
    finding_line,
    finding_title,
    finding_when,
    is_note,
)
from detlab.diagnosis.registry import (
    PREFLIGHT_MODES,
    ConfigProblem,
    DiagnosisSettings,
    get_detector,
    list_detectors,
    preflight_mode,
    register_detector,
    registered_detectors,
    step_level_detectors,
    unmet_needs,
)
from detlab.diagnosis.schema import DiagnosisConfig, RepairsConfig, config_problems
from detlab.diagnosis.windows import is_finite_loss

__all__ = [
    "AWAITS_FAILURE", "DIVERGENCE", "FINDING_HEADER", "PREFLIGHT_MODES", "Alarm", "ConfigProblem", "Detector", "DetectorConfig",
    "Diagnoser", "DiagnosisConfig", "DiagnosisSettings", "DiagnosisStatus", "RepairsConfig", "Divergence", "Finding",
    "Level", "Need", "Rearm", "RunInfo", "Severity", "StopReason", "Verdict", "When", "config_problems", "finding_columns", "finding_line",
    "finding_title", "finding_when", "get_detector", "is_finite_loss", "is_note", "list_detectors", "preflight_mode",
    "register_detector", "registered_detectors", "step_level_detectors", "unmet_needs",
]
