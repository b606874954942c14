"""What a person reads of a finding: every detector, every variant it has, fired on synthetic signals, says
its cause, its evidence and what to do in plain words (no internal key name), with its own remedy; a
note is a note (logged at INFO, recorded as one in summary.json), a failure a warning."""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Iterator, Optional

import pytest
from omegaconf import OmegaConf

from detlab.config import Config
from detlab.diagnosis import (
    Diagnoser,
    DiagnosisConfig,
    Finding,
    Severity,
    finding_columns,
    finding_line,
    registered_detectors,
)
from detlab.schedule import StageBoundaries
from test_diagnosis import (
    FPS,
    avoidance_epoch,
    avoidance_step,
    configure,
    grad_step,
    healthy_epoch,
    healthy_step,
    large_epoch,
    overfit_epoch,
    ranking_epoch,
    run,
    small_fp_epoch,
)

# A snake_case identifier: a signal, an evidence key or a metric's internal name (grad_dead_share, loss_cls).
KEY_NAME = re.compile(r"\b[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+\b")
# What a person types, which may hold one: a config override's dotted key (``loss.box_weight=1``,
# ``dataset.augment.*``) or a script's path (``scripts/dataset_stats.py``).
DOTTED_KEY = re.compile(r"\b[a-z][a-z0-9_]*(?:\.(?:[a-z0-9_]+|\*))+")
SCRIPT = re.compile(r"\S+\.py\b")


def diagnoser(config: Optional[Config], **overrides: Any) -> Diagnoser:
    cfg = configure(DiagnosisConfig(), **overrides)
    return Diagnoser(cfg, StageBoundaries(100, 700, warmup_end=100), 1000, 100, run_config=config)


def steps(diag: Diagnoser, signals, first: int = 0, count: int = 100) -> list[Finding]:
    new = []
    for s in range(first, first + count):
        new += diag.observe_step(s, s // 100 + 1, signals(s))
    return new


def every_kind(config: Optional[Config]) -> Iterator[tuple[str, list[Finding]]]:
    """(what was fired, the findings) for every detector and every variant of its evidence."""
    healthy = healthy_step()

    def with_(**values):
        return lambda s: {**healthy(s), **values}

    yield "divergence: a non-finite loss", steps(diagnoser(config), lambda s: {**healthy(s), "loss_total": math.nan}
                                                 if s == 37 else healthy(s))
    yield "divergence: a loss burst", steps(diagnoser(config), lambda s: {**healthy(s), "loss_cls": 1e5}
                                            if s >= 60 else healthy(s))
    yield "divergence: a gradient burst", steps(diagnoser(config), lambda s: {**healthy(s), "grad_norm": 1e4}
                                                if s >= 60 else healthy(s))
    yield "divergence: gradients not finite", steps(diagnoser(config), lambda s: {**healthy(s), "grad_norm": math.inf}
                                                    if s >= 60 else healthy(s))
    yield "divergence: a non-finite validation loss", diagnoser(config).observe_epoch(
        1, 100, {**healthy_epoch(1), "val/loss_total": math.inf})
    yield "unnormalised input", steps(diagnoser(config), with_(input_mean=110.0, input_std=62.0), count=5)
    yield "unmatched faces", steps(diagnoser(config), with_(face_coverage=0.1), count=20)
    yield "empty images", steps(diagnoser(config), with_(empty_image_share=0.9), count=20)
    yield "dead gradients", steps(diagnoser(config), with_(grad_dead_share=0.8), count=5)
    yield "avoidance: background swamps the class loss", steps(
        diagnoser(config), lambda s: {**avoidance_step(s), "neg_per_pos": 900.0})
    yield "avoidance: only background predicted", run(diagnoser(config), avoidance_step, avoidance_epoch, 3)
    yield "under-confidence", run(diagnoser(config), healthy, ranking_epoch(0.3), 8)
    yield "stuck: a flat loss", steps(diagnoser(config), lambda s: {**healthy(s), "loss_total": 5.0}, count=200)
    yield "stuck: a loss that rose", steps(diagnoser(config), lambda s: {**healthy(s), "loss_total": 5.0 + 0.01 * s},
                                           count=200)
    yield "loss imbalance: the box term dominates", run(diagnoser(config, loss_imbalance__box_epochs=2.0),
                                                        grad_step(0.1, 5.0), None, 2)
    yield "loss imbalance: the class term dominates", run(diagnoser(config), grad_step(2.0, 0.0), None, 2)
    yield "random large boxes", run(diagnoser(config), healthy, large_epoch, 3)
    yield "small false-positive explosion", run(diagnoser(config), healthy, small_fp_epoch, len(FPS) - 1)
    yield "overfitting", run(diagnoser(config), healthy, overfit_epoch, 10)
    chance = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 3 mined negatives per face
    yield "class loss at chance", run(diagnoser(config), lambda s: {**healthy(s), "neg_per_pos": 3.0,
                                                                   "loss_cls": 4 * chance},
                                        lambda e: {**healthy_epoch(e), "val/ap50": 0.02}, 10)


def fired(config: Optional[Config]) -> list[tuple[str, Finding]]:
    out = []
    for what, findings in every_kind(config):
        assert findings, f"{what}: no finding"
        out += [(what, f) for f in findings]
    return out


def bare_config() -> Config:
    """A run without the usual fixes and with a heavy box weight: the advice names them."""
    config = Config()
    config.loss.neg_pos_ratio, config.schedule.warmup, config.loss.box_weight = 0.0, False, 5.0
    config.dataset.augment.hflip, config.early_stopping.patience = False, None
    return config


def config_key_exists(key: str) -> bool:
    key = key.removesuffix(".*")
    return OmegaConf.select(OmegaConf.structured(Config), key, default="<missing>") != "<missing>"


def key_names(text: str, typed: bool) -> list[str]:
    """The internal key names in ``text``; ``typed``: what a person types (config keys that exist,
    scripts' paths) is allowed, as in what to do."""
    if typed:
        text = SCRIPT.sub(" ", text)
        for key in DOTTED_KEY.findall(text):
            assert config_key_exists(key), f"{key!r} is no config key"
        text = DOTTED_KEY.sub(" ", text)
    return KEY_NAME.findall(text)


CONFIGS = {"no config": None, "default run": Config(), "bare run": bare_config()}


@pytest.fixture(scope="module")
def fired_in() -> dict[str, list[tuple[str, Finding]]]:
    """Every kind fired once per config (a run's own advice needs its config; without one, the generic remedy)."""
    return {name: fired(config) for name, config in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_finding_reads_in_plain_words(name, fired_in):
    findings = fired_in[name]
    assert {f.detector for _, f in findings} == {cls.name for cls in registered_detectors()}
    for what, finding in findings:
        title, when, cause, evidence, remedy = finding_columns(finding.to_dict())
        for column in (title, when, cause, evidence):
            assert key_names(column, typed=False) == [], (what, column)
        assert key_names(remedy, typed=True) == [], (what, remedy)
        assert cause != "-" and evidence != "-" and remedy != "-", what
        assert "usual fixes" not in remedy, (what, remedy)
        assert "nan" not in evidence or finding.evidence.get("loss_total") != finding.evidence.get("loss_total"), what
        assert key_names(finding_line(finding.to_dict()), typed=True) == [], what


def test_every_detector_has_its_own_words_and_remedy(fired_in):
    classes = registered_detectors()
    for cls in classes:
        assert cls.cause and cls.remedy and cls.evidence_text and "_" not in cls.display_title(), cls.name
        assert key_names(cls.cause, typed=False) == [] and key_names(cls.remedy, typed=True) == [], cls.name
    # one remedy, one cause, one title per detector: never a shared text
    for attribute in ("remedy", "cause"):
        texts = [getattr(cls, attribute) for cls in classes]
        assert len(set(texts)) == len(texts), attribute
    assert len({cls.display_title() for cls in classes}) == len(classes)
    # given the run's config, the detector's own advice: a remedy of its own for every finding
    remedies: dict[str, set[str]] = {}
    for _, finding in fired_in["default run"]:
        remedies.setdefault(finding.detector, set()).add(finding.remedy)
    for detector, texts in remedies.items():
        others = set().union(*(t for d, t in remedies.items() if d != detector))
        assert not texts & others, detector


def test_the_advice_never_names_what_the_run_already_has(fired_in):
    for name in ("default run", "bare run"):
        config = CONFIGS[name]
        for what, finding in fired_in[name]:
            for override in re.findall(r"([a-z][\w.]*)=(\S+) \(now (\S+)\)", finding.remedy):
                key, new, now = override
                assert new != now, (what, override)
                assert _value_of(config, key) == now, (what, override)


def _value_of(config: Config, key: str) -> str:
    value = OmegaConf.select(OmegaConf.structured(config), key)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def test_notes_are_notes_and_failures_warnings(caplog, fired_in):
    kinds = {cls.name: cls.severity for cls in registered_detectors()}
    assert kinds["under_confidence"] is Severity.NOTE
    assert {name for name, severity in kinds.items() if severity is Severity.NOTE} == {"under_confidence",
                                                                                       "unnormalised_input"}
    note = next(f for _, f in fired_in["default run"] if f.detector == "under_confidence")
    failure = next(f for _, f in fired_in["default run"] if f.detector == "random_large_boxes")
    assert (note.to_dict()["severity"], note.to_dict()["failure"]) == ("note", False)
    assert (failure.to_dict()["severity"], failure.to_dict()["failure"]) == ("failure", True)

    from types import SimpleNamespace

    from detlab.engine.trainer import Trainer

    state = SimpleNamespace(findings=[])
    trainer = SimpleNamespace(state=state, run_callbacks=lambda *args: None)
    caplog.set_level(logging.INFO, logger="detlab.engine.trainer")
    Trainer._report(trainer, [note, failure])
    levels = {r.getMessage().split(",")[0]: r.levelno for r in caplog.records if r.name == "detlab.engine.trainer"}
    assert levels == {"[diagnosis] under-confidence (a note)": logging.INFO,
                      "[diagnosis] random large boxes": logging.WARNING}
    assert [f["severity"] for f in state.findings] == ["note", "failure"]
