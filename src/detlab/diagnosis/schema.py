"""``DiagnosisConfig``, the ``diagnosis`` config group's schema, built from the registered detectors and
repairs: the shared settings (``DiagnosisSettings``), one block per detector (its ``Config``) and the
``repairs`` block (one block per repair); and ``config_problems``, its validation.

``detlab.config`` types ``Config.diagnosis`` with it and validates it with ``config_problems``.
"""

from __future__ import annotations

from typing import Any, Iterator

from detlab.diagnosis import detectors as _builtin  # noqa: F401  (registers the built-in detectors)
from detlab.diagnosis.registry import ConfigProblem, build_schema, detector_problems
from detlab.diagnosis.repairs import repair_problems, repairs_schema

RepairsConfig = repairs_schema(__name__)
DiagnosisConfig = build_schema(__name__, extra=[("repairs", RepairsConfig)])


def config_problems(diagnosis: Any) -> Iterator[ConfigProblem]:
    """Values of a ``diagnosis`` config out of their range: the shared settings', each detector's (in
    evaluation order), then each repair's."""
    yield from detector_problems(diagnosis)
    yield from (ConfigProblem(*problem) for problem in repair_problems(diagnosis.repairs))
