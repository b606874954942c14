"""The benchmark's pre-registered spec (``benchmarks/diagnosis/spec.yaml``): loading, its hash, its checks,
and the runs it plans.

``load_spec()`` reads and checks the file (recipes, injections and detectors that exist, tune and confirm
seeds apart, every baseline rule mapped to known classes) and keeps the sha256 of its bytes, which every
recording and every result carries. ``plan_runs(spec, seed_set)`` expands it into ``PlannedRun``s (each
fault class and healthy variant times its seeds; the overhead pairs); ``assign_parts`` cuts them into N
deterministic slices of about equal estimated time (``--part K/N``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

SPEC_PATH = Path(__file__).resolve().parent / "spec.yaml"
SEED_SETS = ("tune", "confirm")
FAULT, HEALTHY, OVERHEAD = "fault", "healthy", "overhead"


class SpecError(ValueError):
    """The spec file breaks one of its own rules."""


@dataclass(frozen=True)
class OutcomeRule:
    metric: str = "val/ap50"
    failed_below: float = 0.5
    healthy_from: float = 0.8
    diverged_is_failed: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: list[str]
    minutes: float
    requires: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FaultClass:
    name: str
    recipe: str
    overrides: list[str]
    inject: Optional[str]
    expected: list[str]
    why: str
    reports: str
    seeds: int
    gpu_only: bool = False
    minutes: Optional[float] = None


@dataclass(frozen=True)
class HealthyGroup:
    name: str
    recipe: str
    variants: dict[str, list[str]]
    seeds: int
    reference: bool = False
    inject: Optional[str] = None
    minutes: Optional[float] = None


@dataclass(frozen=True)
class Spec:
    version: int
    sha256: str
    path: str
    outcome: OutcomeRule
    diagnosis_overrides: list[str]
    common_overrides: list[str]
    seeds: dict[str, list[int]]
    recipes: dict[str, Recipe]
    faults: dict[str, FaultClass]
    healthy: dict[str, HealthyGroup]
    overhead: dict[str, Any]
    baseline_settings: dict[str, str]
    baseline_rules: dict[str, list[str]]  # "<baseline>.<rule>" -> fault classes it names
    targets: dict[str, Any]

    def rule_classes(self, baseline: str, rule: str) -> list[str]:
        return self.baseline_rules.get(f"{baseline}.{rule}", [])


@dataclass
class PlannedRun:
    """One training run of the spec: what it is, how it is made, and how it is judged."""

    name: str
    kind: str  # fault | healthy | overhead
    group: str  # the fault class, the healthy group, or "overhead"
    variant: str
    recipe: str
    seed_set: str
    seed: int
    overrides: list[str]  # the whole list given to compose_config, in order
    inject: Optional[str] = None
    expected: list[str] = field(default_factory=list)
    reference: bool = False
    gpu_only: bool = False
    requires: list[str] = field(default_factory=list)
    minutes: float = 0.0
    order: int = 0  # an overhead run's place in the timed sequence (the spec's overhead.order)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spec_sha256(path: Path | str = SPEC_PATH) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_spec(path: Path | str = SPEC_PATH, known_injections: Optional[tuple[str, ...]] = None,
              known_detectors: Optional[set[str]] = None) -> Spec:
    """The spec at ``path``, checked (``SpecError`` names the first broken rule). ``known_injections`` /
    ``known_detectors``: the names allowed (default: ``faults.INJECTED_FAULTS`` and the registered
    detectors)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_bytes())
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: not a mapping")
    if known_injections is None:
        from benchmarks.diagnosis.faults import INJECTED_FAULTS

        known_injections = INJECTED_FAULTS
    if known_detectors is None:
        from detlab.diagnosis.registry import registered_detectors

        # a detector's name, or "name:kind" for one of its variants (its evidence_text keys)
        known_detectors = {cls.name for cls in registered_detectors()} | {
            f"{cls.name}:{kind}" for cls in registered_detectors() for kind in cls.evidence_text if kind}

    recipes = {name: Recipe(name, list(r.get("overrides", [])), float(r["minutes"]), list(r.get("requires", [])))
               for name, r in raw["recipes"].items()}
    faults = {}
    for name, f in raw["faults"].items():
        faults[name] = FaultClass(name=name, recipe=f["recipe"], overrides=list(f.get("overrides", [])),
                                  inject=f.get("inject"), expected=list(f.get("expected", [])), why=str(f["why"]),
                                  reports=str(f.get("reports", "")), seeds=int(f["seeds"]),
                                  gpu_only=bool(f.get("gpu_only", False)),
                                  minutes=None if f.get("minutes") is None else float(f["minutes"]))
    healthy = {}
    for name, g in raw["healthy"].items():
        healthy[name] = HealthyGroup(name=name, recipe=g["recipe"],
                                     variants={str(k): list(v) for k, v in g["variants"].items()},
                                     seeds=int(g["seeds"]), reference=bool(g.get("reference", False)),
                                     inject=g.get("inject"),
                                     minutes=None if g.get("minutes") is None else float(g["minutes"]))
    outcome = raw.get("outcome", {})
    spec = Spec(
        version=int(raw["version"]), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), path=str(path),
        outcome=OutcomeRule(metric=outcome.get("metric", "val/ap50"),
                            failed_below=float(outcome.get("failed_below", 0.5)),
                            healthy_from=float(outcome.get("healthy_from", 0.8)),
                            diverged_is_failed=bool(outcome.get("diverged_is_failed", True))),
        diagnosis_overrides=list(raw.get("diagnosis_overrides") or []),
        common_overrides=list(raw.get("common_overrides") or []),
        seeds={k: [int(s) for s in v] for k, v in raw["seeds"].items()},
        recipes=recipes, faults=faults, healthy=healthy, overhead=dict(raw.get("overhead") or {}),
        baseline_settings=dict((raw.get("baselines") or {}).get("settings") or {}),
        baseline_rules={k: list(v.get("classes", [])) for k, v in ((raw.get("baselines") or {}).get("rules") or {}).items()},
        targets=dict(raw.get("targets") or {}),
    )
    check_spec(spec, known_injections, known_detectors)
    return spec


def check_spec(spec: Spec, known_injections: tuple[str, ...], known_detectors: set[str]) -> None:
    def fail(message: str) -> None:
        raise SpecError(f"{spec.path}: {message}")

    if set(spec.seeds) != set(SEED_SETS):
        fail(f"seeds must have exactly {SEED_SETS}, got {sorted(spec.seeds)}")
    shared = set(spec.seeds["tune"]) & set(spec.seeds["confirm"])
    if shared:
        fail(f"tune and confirm seeds must be apart; both have {sorted(shared)}")
    for seed_set, seeds in spec.seeds.items():
        if len(set(seeds)) != len(seeds):
            fail(f"seeds.{seed_set} repeats a seed")
    if not 0 < spec.outcome.failed_below <= spec.outcome.healthy_from:
        fail("outcome: expected 0 < failed_below <= healthy_from")
    most = min(len(v) for v in spec.seeds.values())
    for kind, items in (("faults", spec.faults), ("healthy", spec.healthy)):
        for name, item in items.items():
            if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
                fail(f"{kind}.{name}: a name of letters, digits, '_' and '.'")
            if item.recipe not in spec.recipes:
                fail(f"{kind}.{name}: unknown recipe {item.recipe!r}")
            if item.inject is not None and item.inject not in known_injections:
                fail(f"{kind}.{name}: unknown injection {item.inject!r} (known: {', '.join(known_injections)})")
            if not 1 <= item.seeds <= most:
                fail(f"{kind}.{name}: seeds must be in [1, {most}] (the shortest seed list)")
    for name, f in spec.faults.items():
        unknown = [d for d in f.expected if d not in known_detectors]
        if unknown:
            fail(f"faults.{name}: unknown expected detectors {unknown}")
        if not f.why:
            fail(f"faults.{name}: says why")
    for name, g in spec.healthy.items():
        for variant in g.variants:
            if not re.fullmatch(r"[A-Za-z0-9_.]+", variant):
                fail(f"healthy.{name}.{variant}: a variant name of letters, digits, '_' and '.'")
    references = {g.recipe for g in spec.healthy.values() if g.reference}
    for name, f in spec.faults.items():
        if f.recipe not in references:
            fail(f"faults.{name}: recipe {f.recipe!r} has no reference healthy group (its outcome bar)")
    for key, classes in spec.baseline_rules.items():
        if "." not in key:
            fail(f"baselines.rules.{key}: expected '<baseline>.<rule>'")
        unknown = [c for c in classes if c not in spec.faults]
        if unknown:
            fail(f"baselines.rules.{key}: unknown classes {unknown}")
    if spec.overhead and spec.overhead.get("recipe") not in spec.recipes:
        fail("overhead.recipe: unknown recipe")
    if spec.overhead and spec.overhead.get("order", "off_on") not in ("off_on", "abba"):
        fail("overhead.order: off_on (off, on in every pair) or abba (off, on, on, off, ...)")


def _variant_overrides(spec: Spec, recipe: str, own: list[str], seed: int) -> list[str]:
    return [*spec.common_overrides, *spec.recipes[recipe].overrides, *own, f"train.seed={seed}"]


def plan_runs(spec: Spec, seed_set: str, gpu: Optional[bool] = False) -> list[PlannedRun]:
    """Every run of ``seed_set``, in spec order. ``gpu``: False leaves the GPU-only classes out, True keeps
    only them, None keeps all."""
    if seed_set not in SEED_SETS:
        raise ValueError(f"seed_set must be one of {SEED_SETS}, got {seed_set!r}")
    seeds = spec.seeds[seed_set]
    runs: list[PlannedRun] = []
    for name, f in spec.faults.items():
        if gpu is not None and f.gpu_only != gpu:
            continue
        recipe = spec.recipes[f.recipe]
        for seed in seeds[: f.seeds]:
            runs.append(PlannedRun(
                name=f"fault-{name}-s{seed}", kind=FAULT, group=name, variant="", recipe=f.recipe,
                seed_set=seed_set, seed=seed, overrides=_variant_overrides(spec, f.recipe, f.overrides, seed),
                inject=f.inject, expected=list(f.expected), gpu_only=f.gpu_only, requires=list(recipe.requires),
                minutes=f.minutes if f.minutes is not None else recipe.minutes))
    if gpu:
        return runs
    for name, g in spec.healthy.items():
        recipe = spec.recipes[g.recipe]
        for variant, overrides in g.variants.items():
            for seed in seeds[: g.seeds]:
                runs.append(PlannedRun(
                    name=f"healthy-{name}-{variant}-s{seed}", kind=HEALTHY, group=name, variant=variant,
                    recipe=g.recipe, seed_set=seed_set, seed=seed,
                    overrides=_variant_overrides(spec, g.recipe, overrides, seed), inject=g.inject,
                    reference=g.reference, requires=list(recipe.requires),
                    minutes=g.minutes if g.minutes is not None else recipe.minutes))
    overhead = spec.overhead
    if overhead and seed_set in overhead.get("seed_sets", SEED_SETS):
        recipe = spec.recipes[overhead["recipe"]]
        abba = overhead.get("order", "off_on") == "abba"  # v3: off, on, on, off, ... (a drift favours neither)
        for k in range(int(overhead.get("pairs", 0))):
            for enabled in ((True, False) if abba and k % 2 else (False, True)):
                own = [f"diagnosis.enabled={str(enabled).lower()}"]
                runs.append(PlannedRun(
                    name=f"overhead-{'on' if enabled else 'off'}-{k}", kind=OVERHEAD, group="overhead",
                    variant="on" if enabled else "off", recipe=recipe.name, seed_set=seed_set, seed=seeds[0],
                    overrides=_variant_overrides(spec, recipe.name, own, seeds[0]), requires=list(recipe.requires),
                    minutes=recipe.minutes, order=sum(r.kind == OVERHEAD for r in runs)))
    return runs


def assign_parts(runs: list[PlannedRun], n: int) -> list[list[PlannedRun]]:
    """``n`` deterministic slices of about equal estimated minutes: the runs by decreasing estimate (then
    name), each to the slice with the least so far (the first such). The overhead runs, timed alone, go
    together to the last slice."""
    if n < 1:
        raise ValueError("n must be >= 1")
    parts: list[list[PlannedRun]] = [[] for _ in range(n)]
    load = [0.0] * n
    # the pairs in their planned order (the spec's overhead.order)
    timed = sorted((r for r in runs if r.kind == OVERHEAD), key=lambda r: r.order)
    for run in sorted((r for r in runs if r.kind != OVERHEAD), key=lambda r: (-r.minutes, r.name)):
        k = min(range(n), key=lambda i: (load[i], i))
        parts[k].append(run)
        load[k] += run.minutes
    parts[-1].extend(timed)
    return parts


def parse_part(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--part takes K/N (e.g. 3/40), got {text!r}")
    k, n = int(match.group(1)), int(match.group(2))
    if not 1 <= k <= n:
        raise ValueError(f"--part {text}: expected 1 <= K <= N")
    return k, n


def estimated_minutes(runs: list[PlannedRun]) -> float:
    return sum(r.minutes for r in runs)
