"""``DiagnosisConfig``, the ``diagnosis`` config group's schema, built from the registered detectors:
the shared settings (``DiagnosisSettings``) and one block per detector, its ``Config``.

``detlab.config`` types ``Config.diagnosis`` with it and validates it with ``config_problems``.
"""

from __future__ import annotations

from detlab.diagnosis import detectors as _builtin  # noqa: F401  (registers the built-in detectors)
from detlab.diagnosis.registry import build_schema

DiagnosisConfig = build_schema(__name__)
