"""The detector registry (torchvision's ``register_model`` / ``get_model`` pattern).

``@register_detector`` on a ``Detector`` subclass is all the diagnosis needs to know about it: from
the registered classes come the ``diagnosis`` config schema (``build_schema``: the shared settings
and one block per detector, the detector's ``Config``), its validation (``detector_problems``: each
detector's ``checks``), the evaluation order (registration order), the step/epoch split the
sweep report uses (``step_level_detectors``) and which recorded signals each one needs
(``unmet_needs``: a diagnosis of curves skips a detector whose signals were not recorded).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Collection, Iterator, NamedTuple, Sequence, TypeVar

from detlab.diagnosis.detector import (
    Detector,
    DetectorConfig,
    Level,
    Need,
    Severity,
    overrides_check_epoch,
    overrides_check_step,
)

D = TypeVar("D", bound=type[Detector])

# name -> class, in registration order, which is the evaluation order: a detector registered first
# reports first at a shared step, and its stop takes precedence.
_DETECTORS: dict[str, type[Detector]] = {}


@dataclass
class DiagnosisSettings:
    """What all detectors share; the schema adds one block per registered detector.

    Step windows count optimiser steps, epoch windows count validation epochs. Each detector fires
    one finding per run (its onset); the TensorBoard scalar ``diagnosis/<detector>`` shows whether
    its condition currently holds. ``enabled`` switches all detectors off, a block's ``enabled`` one.
    """

    enabled: bool = True
    # Steps between gradient samples (loss-term norms on the backbone output, dead share) after the first part
    # of training; v3: 20 (was 10), at least one sample an epoch on the default data. The sample is almost all
    # of the diagnosis's cost, and after the first part only dead_gradients and unnormalised_input read it.
    grad_norm_every: int = 20
    # ... in the first part of training, where the data and gradient checks and loss_imbalance judge
    grad_norm_every_first_part: int = 5
    # Loss windows (steps) of stuck and avoidance: shrunk to half the first part of training when longer.
    loss_window: int = 50
    # The pre-flight checks before the first optimiser step (detlab.engine.preflight): on (a fatal
    # finding stops the run: exit 2), warn (report, never stop) or off. Not part of ``enabled``.
    preflight: str = "on"
    # The repairs (detlab.diagnosis.repairs): true turns on those whose diagnosis.repairs.<name> block says
    # enabled (the ones the diagnosis benchmark showed to help). Not part of ``enabled``'s detectors, but
    # a repair answers findings, so it needs them.
    repair: bool = False


PREFLIGHT_MODES = ("on", "warn", "off")


def preflight_mode(value: Any) -> Any:
    """``diagnosis.preflight`` as one of ``PREFLIGHT_MODES`` where it names one: YAML 1.1 reads an
    unquoted ``on`` / ``off`` as a boolean, which the schema's string field then holds as ``"True"`` /
    ``"False"``; those mean ``on`` / ``off``. Any other value is returned as it is (the validation names it)."""
    text = str(value).strip().lower()
    return {"true": "on", "false": "off"}.get(text, text if text in PREFLIGHT_MODES else value)


def register_detector(cls: D) -> D:
    """Class decorator: add a detector to the diagnosis (see ``detlab.diagnosis.detector``)."""
    name = cls.name
    if not name or not name.isidentifier():
        raise ValueError(f"{cls.__qualname__}: a detector's name names its config block: an identifier, not {name!r}")
    if name in _DETECTORS or name in {f.name for f in fields(DiagnosisSettings)} | {"repairs"}:
        raise ValueError(f"{cls.__qualname__}: the name {name!r} is taken")
    if not isinstance(getattr(cls, "level", None), Level):
        raise ValueError(f"{cls.__qualname__}: declare level = Level.STEP or Level.EPOCH")
    if not (is_dataclass(cls.Config) and issubclass(cls.Config, DetectorConfig)):
        raise ValueError(f"{cls.__qualname__}: Config must be a dataclass deriving from DetectorConfig")
    overrides = overrides_check_step if cls.level is Level.STEP else overrides_check_epoch
    if not overrides(cls):
        raise ValueError(f"{cls.__qualname__}: a {cls.level.value}-level detector overrides check_{cls.level.value}")
    if not all(isinstance(need, Need) and need.signals for need in cls.needs):
        raise ValueError(f"{cls.__qualname__}: needs is a tuple of Need, each naming at least one signal")
    if not isinstance(getattr(cls, "severity", None), Severity):
        raise ValueError(f"{cls.__qualname__}: declare severity = Severity.FAILURE or Severity.NOTE")
    missing = [attr for attr in ("cause", "remedy", "evidence_text") if not getattr(cls, attr, None)]
    if missing:
        raise ValueError(f"{cls.__qualname__}: declare what a person reads, in plain words: {', '.join(missing)}")
    cls.Config()  # every setting has a default
    if "title" not in vars(cls) or not cls.title:
        cls.title = name.replace("_", " ")
    _DETECTORS[name] = cls
    return cls


def get_detector(name: str) -> type[Detector]:
    try:
        return _DETECTORS[name]
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; registered: {', '.join(_DETECTORS)}") from None


def list_detectors() -> tuple[str, ...]:
    """The registered detectors' names, in evaluation order."""
    return tuple(_DETECTORS)


def registered_detectors() -> tuple[type[Detector], ...]:
    """The registered detector classes, in evaluation order."""
    return tuple(_DETECTORS.values())


def step_level_detectors() -> frozenset[str]:
    """Detectors whose findings are dated by a step (``Level.STEP``); the others judge whole epochs."""
    return frozenset(name for name, cls in _DETECTORS.items() if cls.level is Level.STEP)


def unmet_needs(cls: type[Detector], available: Collection[str]) -> tuple[Need, ...]:
    """The ``needs`` of ``cls`` that none of the ``available`` signals meets (empty: it can run)."""
    return tuple(need for need in cls.needs if not any(signal in available for signal in need.signals))


def block_of(diagnosis: Any, cls: type[Detector]) -> DetectorConfig:
    """``cls``'s block of a ``diagnosis`` config; its defaults when the schema has none (a detector
    registered after the schema was built, or one only handed to a ``Diagnoser``)."""
    block = getattr(diagnosis, cls.name, None)
    return block if block is not None else cls.Config()


def build_schema(module: str, extra: Sequence[tuple[str, type]] = ()) -> type[DiagnosisSettings]:
    """The ``diagnosis`` group's structured config, ``DiagnosisConfig``: ``DiagnosisSettings`` plus a
    ``<name>`` field per registered detector, typed as its ``Config`` (Hydra checks keys and types
    against it), and the ``extra`` blocks (name, dataclass). ``module`` is where it is bound (pickling
    finds it there)."""
    blocks = [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in _DETECTORS.items()]
    blocks += [(name, block, field(default_factory=block)) for name, block in extra]
    schema = make_dataclass("DiagnosisConfig", blocks, bases=(DiagnosisSettings,))
    schema.__module__ = module
    schema.__doc__ = "Failure-pattern detectors (``detlab.diagnosis``): one block per detector, named like it."
    return schema


class ConfigProblem(NamedTuple):
    key: str  # the full key: diagnosis.<block>.<setting>
    value: Any
    message: str  # what the value must be


def detector_problems(diagnosis: Any) -> Iterator[ConfigProblem]:
    """Values of a ``diagnosis`` config out of their range: the shared settings', then each
    registered detector's ``checks`` of its block, in evaluation order (``detlab.diagnosis.schema``'s
    ``config_problems`` adds the repairs')."""
    shared = {"grad_norm_every": (diagnosis.grad_norm_every >= 1, "must be >= 1"),
              "grad_norm_every_first_part": (diagnosis.grad_norm_every_first_part >= 1, "must be >= 1"),
              "loss_window": (diagnosis.loss_window >= 1, "must be >= 1"),
              "preflight": (diagnosis.preflight in PREFLIGHT_MODES, f"expected one of {', '.join(PREFLIGHT_MODES)}")}
    for key, (valid, message) in shared.items():
        if not valid:
            yield ConfigProblem(f"diagnosis.{key}", getattr(diagnosis, key), message)
    for name, cls in _DETECTORS.items():
        block = block_of(diagnosis, cls)
        for key, (valid, message) in cls.checks(block).items():
            if not valid:
                yield ConfigProblem(f"diagnosis.{name}.{key}", getattr(block, key), message)
