"""The repairs' pre-registration (``benchmarks/diagnosis/repairs.yaml``): loading, its hash, its checks, and
the runs ``bench_diagnosis --repairs`` trains.

``load_repairs(spec)`` reads the file, keeps the sha256 of its bytes and checks it against the diagnosis
spec it rides on (the same version; every fault class either rescuable or not, once). ``repair_plan``
reduces a seed set's runs to those worth training with the switch on: the runs of the rescuable classes and
the healthy runs on which a repair may act. A run whose recording without repairs has no finding that a
repair the switch turns on answers trains exactly as without the switch (a repair acts only on a finding;
tests/test_repairs.py), so it is its own twin and is not trained again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from benchmarks.diagnosis.spec import FAULT, HEALTHY, SPEC_PATH, PlannedRun, Spec, SpecError, plan_runs

REPAIRS_PATH = Path(__file__).resolve().parent / "repairs.yaml"
HEALTHY_RULE = "rerun_only_when_a_repair_would_act"  # the one healthy rule version 1 knows


def switched_on_answers(switch: Sequence[str]) -> frozenset[str]:
    """The detectors whose findings the repairs that ``switch`` turns on answer (each repair's block says
    whether ``diagnosis.repair=true`` turns it on). Composes a config: call it where Hydra is free."""
    from detlab.config import compose_config
    from detlab.diagnosis.repairs import Repairs as RunRepairs

    on = RunRepairs(compose_config(overrides=list(switch)).diagnosis)
    return frozenset(name for repair in on.repairs for name in repair.answers)


class RepairsError(SpecError):
    """The repairs file breaks one of its own rules, or does not fit the spec."""


@dataclass(frozen=True)
class Repairs:
    version: int
    sha256: str
    path: str
    spec_version: int
    switch: list[str]  # overrides appended to every run with repairs
    rescued_within: float
    rescuable: dict[str, str]  # class -> why a repair can rescue it
    not_rescuable: dict[str, str]  # class -> why not
    healthy: str
    targets: dict[str, Any]


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a class listed twice must be an error instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise RepairsError(f"listed twice: {twice}")
        return super().construct_mapping(node, deep)


def repairs_spec_path(path: Path | str = REPAIRS_PATH) -> Path:
    """The spec file the repairs file rides on (its ``spec_version``): spec.yaml while that is its version,
    else the older version kept byte for byte beside it (spec_v<N>.yaml)."""
    version = int(yaml.safe_load(Path(path).read_bytes())["spec_version"])
    current = int(yaml.safe_load(SPEC_PATH.read_bytes())["version"])
    return SPEC_PATH if version == current else SPEC_PATH.with_name(f"spec_v{version}.yaml")


def load_repairs(spec: Spec, path: Path | str = REPAIRS_PATH) -> Repairs:
    """The repairs file at ``path``, checked against ``spec`` (``RepairsError`` names the broken rule)."""
    path = Path(path)
    data = path.read_bytes()

    def fail(message: str) -> None:
        raise RepairsError(f"{path}: {message}")

    try:
        raw = yaml.load(data, Loader=_UniqueKeys)
    except RepairsError as e:
        raise RepairsError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        fail("not a mapping")
    repairs = Repairs(version=int(raw["version"]), sha256=hashlib.sha256(data).hexdigest(), path=str(path),
                      spec_version=int(raw["spec_version"]), switch=[str(o) for o in raw.get("switch") or []],
                      rescued_within=float(raw["rescued_within"]),
                      rescuable={str(k): str(v) for k, v in (raw.get("rescuable") or {}).items()},
                      not_rescuable={str(k): str(v) for k, v in (raw.get("not_rescuable") or {}).items()},
                      healthy=str(raw.get("healthy")), targets=dict(raw.get("targets") or {}))
    if repairs.spec_version != spec.version:
        fail(f"spec_version {repairs.spec_version} is not the spec's version {spec.version}")
    if not repairs.switch:
        fail("switch: the overrides that turn the repairs on")
    if not 0 <= repairs.rescued_within < 1:
        fail("rescued_within must be in [0, 1)")
    both = sorted(set(repairs.rescuable) & set(repairs.not_rescuable))
    if both:
        fail(f"both rescuable and not_rescuable: {both}")
    listed = {**repairs.rescuable, **repairs.not_rescuable}
    missing = [c for c in spec.faults if c not in listed]
    unknown = sorted(c for c in listed if c not in spec.faults)
    if missing or unknown:  # both named at once: a misspelt class is one of each
        fail("; ".join([*([f"fault classes in neither rescuable nor not_rescuable: {missing}"] if missing else []),
                        *([f"unknown fault classes: {unknown}"] if unknown else [])]))
    if repairs.healthy != HEALTHY_RULE:
        fail(f"healthy: expected {HEALTHY_RULE!r}, got {repairs.healthy!r}")
    return repairs


def repair_plan(spec: Spec, repairs: Repairs, seed_set: str, plain: Mapping[str, Sequence[str]],
                answers: frozenset[str], gpu: Optional[bool] = False) -> list[PlannedRun]:
    """The runs of ``seed_set`` to train with the switch on, in spec order: each run of a rescuable class
    and each healthy run whose recording without repairs has a failure finding (or a risk, v6) of a detector in
    ``answers`` (``switched_on_answers``) or is not recorded yet (nothing says a repair would stay idle). ``plain``: run
    name -> the detectors of its findings without repairs, for the runs recorded so far. No overhead pair
    (it measures the diagnosis, not the repairs)."""

    def acts(run: PlannedRun) -> bool:
        return run.name not in plain or bool(answers & set(plain[run.name]))

    def wanted(run: PlannedRun) -> bool:
        if run.kind == FAULT:
            return run.group in repairs.rescuable and acts(run)
        return run.kind == HEALTHY and acts(run)

    return [r for r in plan_runs(spec, seed_set, gpu=gpu) if wanted(r)]
