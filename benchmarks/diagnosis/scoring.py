"""The benchmark's scoring: outcome labels from the runs' records, then two scorings of every system.

Ground truth from the outcome, beside the declared class (the spec's ``outcome``): a run *failed* when
its final val AP50 is under ``failed_below`` (0.5) x the median of the reference healthy runs of its
recipe in the same seed set, or it diverged; it is *healthy* at >= ``healthy_from`` (0.8) x that median;
in between *neither*. A run that crashed is *error*, one without a final metric or a bar *unknown*.

Two scorings, for detlab's diagnosis and for each baseline alike:

- detection against the outcome: the share of failed runs (any kind) with an alarm (``flagged_rate``),
  and of healthy runs (any kind, whatever was injected) with one (``false_alarm_rate``). For detlab an
  alarm is any finding with ``failure: true`` (``severity: failure``), which the trainer logs at WARNING;
  notes (``failure: false``, ``severity: note``; logged at INFO) are counted on their own (``notes``), and
  ``false_alarm_rate_with_notes`` counts them as alarms too;
- the right first diagnosis against the declared class, on the fault runs that failed: the first alarm
  is right when it is one of the class's expected detectors (detlab; ``detector:kind`` names one variant)
  or a rule the spec maps to the class (a baseline). Classes that no detector (or rule) can name stay in the denominator
  (``right_first_rate``); ``right_first_rate_nameable`` leaves them out.

``median_detect_fraction``: the first alarm's step / the run's planned steps, median over the flagged
failed runs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

FAILED, HEALTHY, NEITHER, UNKNOWN, ERROR = "failed", "healthy", "neither", "unknown", "error"
DETLAB = "detlab"


@dataclass
class RunResult:
    """What the scoring reads of one run (from its recording)."""

    name: str
    kind: str  # fault | healthy | overhead
    group: str  # the fault class or healthy group
    recipe: str
    seed_set: str
    seed: int = 0
    variant: str = ""
    reference: bool = False
    expected: list[str] = field(default_factory=list)
    status: str = "completed"
    final_metric: Optional[float] = None  # the outcome metric's last value (val/ap50)
    final_train_loss: Optional[float] = None
    total_steps: int = 1
    # findings: {"detector", "kind", "step", "failure"} in the order the diagnosis found them
    findings: list[dict[str, Any]] = field(default_factory=list)
    # baselines: name -> {"rule", "step"} of its first alarm, or None
    baselines: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    wall_time_s: Optional[float] = None
    # the run's process CPU time (cpu_user_s, cpu_system_s) and the machine's steal time (machine_steal_s)
    process: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_time_s(self) -> Optional[float]:
        """User and system CPU time of the run's process, where recorded (v6)."""
        user, system = self.process.get("cpu_user_s"), self.process.get("cpu_system_s")
        return float(user) + float(system) if _finite(user) and _finite(system) else None


@dataclass(frozen=True)
class Alarm:
    """A system's first alarm on a run: the detector (detlab) or rule (a baseline), and its step."""

    name: str
    step: int
    kind: str = ""  # detlab: which of the detector's variants fired


def matches(alarm: Alarm, expected: Collection[str]) -> bool:
    """Whether detlab's alarm is one of ``expected``: a detector's name matches any of its variants,
    ``detector:kind`` only that variant (spec v3: ``dead_gradients:killed``, dead gradients after too-large
    updates, names a too-high rate; the frozen variant does not)."""
    return alarm.name in expected or (bool(alarm.kind) and f"{alarm.name}:{alarm.kind}" in expected)


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------ outcome
def reference_medians(results: Sequence[RunResult]) -> dict[tuple[str, str], float]:
    """(recipe, seed set) -> the median final metric of its reference healthy runs that have one."""
    values: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.kind == "healthy" and r.reference and _finite(r.final_metric) and not _diverged(r):
            values.setdefault((r.recipe, r.seed_set), []).append(float(r.final_metric))
    return {key: statistics.median(v) for key, v in values.items()}


def _diverged(r: RunResult) -> bool:
    return r.status == "diverged" or (r.final_train_loss is not None and not _finite(r.final_train_loss))


def outcome(r: RunResult, medians: Mapping[tuple[str, str], float], failed_below: float = 0.5,
            healthy_from: float = 0.8, diverged_is_failed: bool = True) -> str:
    """The run's outcome label (module docstring)."""
    if r.status == "failed":
        return ERROR
    if diverged_is_failed and _diverged(r):
        return FAILED
    bar = medians.get((r.recipe, r.seed_set))
    if bar is None or not _finite(r.final_metric):
        return UNKNOWN
    value = float(r.final_metric)
    if value < failed_below * bar:
        return FAILED
    if value >= healthy_from * bar:
        return HEALTHY
    return NEITHER


def outcome_labels(results: Sequence[RunResult], rule: Any = None) -> dict[str, str]:
    """Every run's label; ``rule``: the spec's ``OutcomeRule`` (default 0.5 / 0.8, divergence fails)."""
    medians = reference_medians(results)
    kwargs = {} if rule is None else {"failed_below": rule.failed_below, "healthy_from": rule.healthy_from,
                                      "diverged_is_failed": rule.diverged_is_failed}
    return {r.name: outcome(r, medians, **kwargs) for r in results}


# ------------------------------------------------------------------------------------ alarms
def first_failure(findings: Sequence[Mapping[str, Any]]) -> Optional[Alarm]:
    """The first finding with ``failure`` true (findings are in the order they were found)."""
    return next((alarm_of(f) for f in findings if f.get("failure", True)), None)


def first_finding(findings: Sequence[Mapping[str, Any]]) -> Optional[Alarm]:
    """The first finding, notes included."""
    return alarm_of(findings[0]) if findings else None


def alarm_of(finding: Mapping[str, Any]) -> Alarm:
    """A finding's record as an alarm (recordings before spec v3 have no ``kind``)."""
    return Alarm(str(finding["detector"]), int(finding["step"]), str(finding.get("kind", "")))


def detlab_alarm(r: RunResult) -> Optional[Alarm]:
    return first_failure(r.findings)


def baseline_alarm(name: str) -> Callable[[RunResult], Optional[Alarm]]:
    def pick(r: RunResult) -> Optional[Alarm]:
        hit = r.baselines.get(name)
        return None if hit is None else Alarm(str(hit["rule"]), int(hit["step"]))

    return pick


# ------------------------------------------------------------------------------------ scoring
def score(results: Sequence[RunResult], labels: Mapping[str, str], alarm: Callable[[RunResult], Optional[Alarm]],
          right: Callable[[RunResult, Alarm], bool], nameable: Callable[[RunResult], bool]) -> dict[str, Any]:
    """Both scorings of one system (module docstring). ``right(run, alarm)``: the first alarm names the
    run's declared class; ``nameable(run)``: the system has a detector or rule for the run's class."""
    scored = [r for r in results if r.kind != "overhead"]
    failed = [r for r in scored if labels.get(r.name) == FAILED]
    healthy = [r for r in scored if labels.get(r.name) == HEALTHY]
    declared = [r for r in failed if r.kind == "fault"]
    hits = {r.name: alarm(r) for r in scored}
    flagged = [r for r in failed if hits[r.name] is not None]
    false_alarms = [r for r in healthy if hits[r.name] is not None]
    right_runs = [r for r in declared if hits[r.name] is not None and right(r, hits[r.name])]
    nameable_runs = [r for r in declared if nameable(r)]
    fractions = [hits[r.name].step / max(r.total_steps, 1) for r in flagged]

    def group_row(runs: list[RunResult]) -> dict[str, Any]:
        """What the per-class and per-healthy-group tables share: the outcome labels, the first alarm of each
        run (detector@step) and the false alarms among them."""
        return {"runs": len(runs),
                "labels": {lab: sum(labels.get(r.name) == lab for r in runs) for lab in
                           (FAILED, NEITHER, HEALTHY, UNKNOWN, ERROR) if any(labels.get(r.name) == lab for r in runs)},
                "first": [None if hits[r.name] is None else f"{hits[r.name].name}@{hits[r.name].step}" for r in runs],
                "false_alarms": sum(r in false_alarms for r in runs)}

    def of_kind(kind: str) -> dict[str, list[RunResult]]:
        return {g: [r for r in scored if r.kind == kind and r.group == g]
                for g in sorted({r.group for r in scored if r.kind == kind})}

    per_class: dict[str, dict[str, Any]] = {}
    for cls, runs in of_kind("fault").items():
        cls_failed = [r for r in runs if labels.get(r.name) == FAILED]
        per_class[cls] = {**group_row(runs), "failed": len(cls_failed),
                          "flagged": sum(hits[r.name] is not None for r in cls_failed),
                          "right": sum(r in right_runs for r in cls_failed)}
    per_healthy_group = {grp: {**group_row(runs), "final_metric": [r.final_metric for r in runs]}
                         for grp, runs in of_kind("healthy").items()}
    return {
        "failed_runs": len(failed), "healthy_runs": len(healthy), "declared_failed_runs": len(declared),
        "flagged": len(flagged), "false_alarms": len(false_alarms), "right_first": len(right_runs),
        "flagged_rate": _rate(len(flagged), len(failed)),
        "false_alarm_rate": _rate(len(false_alarms), len(healthy)),
        "right_first_rate": _rate(len(right_runs), len(declared)),
        "right_first_rate_nameable": _rate(sum(r in right_runs for r in nameable_runs), len(nameable_runs)),
        "median_detect_fraction": statistics.median(fractions) if fractions else None,
        "false_alarm_runs": [f"{r.name}: {hits[r.name].name}@{hits[r.name].step}" for r in false_alarms],
        "per_class": per_class,
        "per_healthy_group": per_healthy_group,
    }


def _rate(k: int, n: int) -> Optional[float]:
    return k / n if n else None


def notes(results: Sequence[RunResult], labels: Mapping[str, str]) -> dict[str, Any]:
    """Findings with ``failure: false``: on how many healthy and failed runs, and which."""
    scored = [r for r in results if r.kind != "overhead"]
    healthy = [r for r in scored if labels.get(r.name) == HEALTHY]
    failed = [r for r in scored if labels.get(r.name) == FAILED]
    has = {r.name: [f["detector"] for f in r.findings if not f.get("failure", True)] for r in scored}
    counts: dict[str, int] = {}
    for r in scored:
        for d in has[r.name]:
            counts[d] = counts.get(d, 0) + 1
    return {"healthy_with_notes": sum(bool(has[r.name]) for r in healthy), "healthy_runs": len(healthy),
            "rate_on_healthy": _rate(sum(bool(has[r.name]) for r in healthy), len(healthy)),
            "failed_with_notes": sum(bool(has[r.name]) for r in failed), "failed_runs": len(failed),
            "rate_on_failed": _rate(sum(bool(has[r.name]) for r in failed), len(failed)),
            "by_detector": dict(sorted(counts.items()))}


def score_all(results: Sequence[RunResult], spec: Any) -> dict[str, Any]:
    """Labels, detlab's and every baseline's scores, the notes, and the overhead, for one seed set's runs."""
    labels = outcome_labels(results, spec.outcome)
    faults = spec.faults

    def detlab_right(r: RunResult, a: Alarm) -> bool:
        return matches(a, r.expected)

    out: dict[str, Any] = {
        "labels": labels,
        "reference_medians": {f"{recipe}/{seed_set}": v for (recipe, seed_set), v in reference_medians(results).items()},
        DETLAB: score(results, labels, detlab_alarm, detlab_right, lambda r: bool(r.expected)),
    }
    with_notes = score(results, labels, lambda r: first_finding(r.findings), detlab_right, lambda r: bool(r.expected))
    out[DETLAB]["false_alarm_rate_with_notes"] = with_notes["false_alarm_rate"]
    out[DETLAB]["false_alarms_with_notes"] = with_notes["false_alarms"]
    out["notes"] = notes(results, labels)
    baselines = sorted({name for r in results for name in r.baselines})
    out["baselines"] = {}
    for name in baselines:
        named = {cls for key, classes in spec.baseline_rules.items() if key.split(".", 1)[0] == name for cls in classes}

        def right(r: RunResult, a: Alarm, name: str = name) -> bool:
            return r.group in spec.rule_classes(name, a.name)

        out["baselines"][name] = score(results, labels, baseline_alarm(name), right,
                                       lambda r, named=named: r.group in named)
    out["overhead"] = overhead(results)
    out["overhead_cpu"] = overhead(results, "cpu_time_s")
    out["overhead_pairs"] = overhead_pairs(results)
    out["classes_without_detector"] = sorted(c for c, f in faults.items() if not f.expected)
    return out


def overhead(results: Sequence[RunResult], measure: str = "wall_time_s") -> Optional[float]:
    """Median ``measure`` (wall time; ``cpu_time_s``: the process's CPU time) of the overhead runs with the
    diagnosis over those without, minus 1."""
    def times(variant: str) -> list[float]:
        return [float(getattr(r, measure)) for r in results
                if r.kind == "overhead" and r.variant == variant and _finite(getattr(r, measure))]

    on, off = times("on"), times("off")
    if not on or not off:
        return None
    return statistics.median(on) / statistics.median(off) - 1.0


def overhead_pairs(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Pair by pair (``overhead-on-k`` with ``overhead-off-k``): the wall and CPU times of both runs, each
    ratio minus 1, and the machine's steal time over each run, where recorded."""
    runs = {r.name: r for r in results if r.kind == "overhead"}
    out = []
    for k in sorted(int(n.rsplit("-", 1)[1]) for n in runs if n.startswith("overhead-on-")):
        on, off = runs.get(f"overhead-on-{k}"), runs.get(f"overhead-off-{k}")
        if on is None or off is None:
            continue
        row: dict[str, Any] = {"pair": k}
        for measure, key in (("wall_time_s", "wall"), ("cpu_time_s", "cpu")):
            a, b = getattr(on, measure), getattr(off, measure)
            row[key] = (a / b - 1.0) if _finite(a) and _finite(b) and b > 0 else None
            row[f"{key}_on_s"], row[f"{key}_off_s"] = a, b
        row["steal_on_s"], row["steal_off_s"] = on.process.get("machine_steal_s"), off.process.get("machine_steal_s")
        out.append(row)
    return out


# ------------------------------------------------------------------------------------ targets
def beats(recall: float, false_alarms: float, their_recall: float, their_false_alarms: float,
          dominates: bool) -> bool:
    """Whether detlab beats a baseline. Strict (spec v1-v2): a higher recall at equal or fewer false alarms.
    ``dominates`` (spec v3): a recall at least theirs at equal or fewer false alarms, one of the two strictly
    better (the strict reading cannot be met against a baseline at 100% recall)."""
    if false_alarms > their_false_alarms:
        return False
    if not dominates:
        return recall > their_recall
    return recall >= their_recall and (recall > their_recall or false_alarms < their_false_alarms)


def targets(report: Mapping[str, Any], spec_targets: Mapping[str, Any]) -> dict[str, Any]:
    """Each target of the spec with detlab's figure and whether it is met (None: no figure); and, per
    baseline, whether detlab's recall is higher at equal or fewer false alarms."""
    d = report[DETLAB]
    figures = {"flagged_rate": d["flagged_rate"], "right_first_rate": d["right_first_rate"],
               "false_alarm_rate": d["false_alarm_rate"], "median_detect_fraction": d["median_detect_fraction"],
               "overhead": report.get("overhead")}
    out: dict[str, Any] = {}
    for key, value in figures.items():
        bound = spec_targets.get(key)
        if not isinstance(bound, Mapping):
            continue
        kind, limit = ("min", bound["min"]) if "min" in bound else ("max", bound["max"])
        met = None if value is None else (value >= limit if kind == "min" else value <= limit)
        entry = {"value": value, "target": limit, "kind": kind, "met": met}
        if key == "false_alarm_rate":
            enough = d["healthy_runs"] >= int(spec_targets.get("min_healthy_runs", 0))
            entry["healthy_runs"] = d["healthy_runs"]
            entry["met"] = None if met is None else (met and enough)
        out[key] = entry
    rule = spec_targets.get("beats_baselines")
    if rule:
        for name, b in report["baselines"].items():
            figures = (d["flagged_rate"], d["false_alarm_rate"], b["flagged_rate"], b["false_alarm_rate"])
            strict = beats(*figures, dominates=False) if None not in figures else None
            met = beats(*figures, dominates=rule == "dominates") if None not in figures else None
            out[f"beats_{name}"] = {"value": figures[:2], "target": figures[2:], "met": met, "strict": strict,
                                    "rule": "dominates" if rule == "dominates" else "strict"}
    return out


# ------------------------------------------------------------------------------------ rescue
def rescued(r: RunResult, medians: Mapping[tuple[str, str], float], within: float) -> bool:
    """The repaired run ended with a final AP50 of at least (1 - ``within``) x its recipe's reference median
    (repairs.yaml). A crashed run has no final AP50 to count."""
    bar = medians.get((r.recipe, r.seed_set))
    return (r.status != "failed" and bar is not None and _finite(r.final_metric)
            and float(r.final_metric) >= (1.0 - within) * bar)


def rescue(repaired: Sequence[RunResult], plain: Sequence[RunResult], spec: Any,
           repairs: Any, identical: Collection[str] = ()) -> Optional[dict[str, Any]]:
    """The repairs' figures (repairs.yaml), each repaired run against its twin without repairs (``plain``,
    by name); the outcome labels and the reference medians are the plain runs' (the benchmark's bars).

    Per rescuable class: its failed plain runs, how many of their twins are rescued, and whether the class
    is (more than half of at least one). ``identical``: fault runs not re-run because no finding of theirs
    is one a repair answers; they train exactly as without the switch, so each is its own twin. Per healthy
    group: the mean final AP50 change over the group's plain runs, a run not re-run counting 0 (it trains
    identically), against the seed-to-seed standard deviation of the plain runs."""
    if not repaired or not plain:
        return None
    labels, medians = outcome_labels(plain, spec.outcome), reference_medians(plain)
    twins = {r.name: r for r in plain}
    rerun = {r.name for r in repaired}
    same = [r for r in plain if r.kind == "fault" and r.name in identical and r.name not in rerun]
    classes: dict[str, dict[str, Any]] = {}
    for cls in repairs.rescuable:
        runs = [r for r in [*repaired, *same] if r.kind == "fault" and r.group == cls and r.name in twins]
        failed = [r for r in runs if labels[r.name] == FAILED]
        saved = [r for r in failed if rescued(r, medians, repairs.rescued_within)]
        classes[cls] = {"runs": len(runs), "failed": len(failed), "rescued": len(saved),
                        "rescued_runs": [r.name for r in saved],
                        "ap50": [[twins[r.name].final_metric, r.final_metric] for r in runs],
                        "not_rerun": [r.name for r in runs if r.name not in rerun],
                        "class_rescued": bool(failed) and len(saved) > len(failed) / 2}
    judged = [c for c in classes.values() if c["failed"]]
    by_name = {r.name: r for r in repaired}
    groups: dict[str, dict[str, Any]] = {}
    for group in sorted({r.group for r in plain if r.kind == "healthy"}):
        values = {r.name: float(r.final_metric) for r in plain
                  if r.kind == "healthy" and r.group == group and _finite(r.final_metric)}
        changes = {n: float(by_name[n].final_metric) - v for n, v in values.items()
                   if n in by_name and _finite(by_name[n].final_metric)}
        change = sum(changes.values()) / len(values) if values else None
        spread = statistics.stdev(values.values()) if len(values) >= 2 else None
        within = True if change == 0 else None if change is None or spread is None else abs(change) <= spread
        groups[group] = {"runs": len(values), "rerun": len(changes), "mean_change": change, "spread": spread,
                         "within_spread": within}
    return {"rescued_within": repairs.rescued_within, "classes": classes,
            "rescued_classes": sum(c["class_rescued"] for c in judged), "classes_with_failed_runs": len(judged),
            "rescued_class_rate": _rate(sum(c["class_rescued"] for c in judged), len(judged)),
            "healthy": groups,
            "healthy_change_within_spread": None if any(g["within_spread"] is None for g in groups.values())
            else all(g["within_spread"] for g in groups.values())}


def rescue_targets(res: Mapping[str, Any], repairs_targets: Mapping[str, Any]) -> dict[str, Any]:
    """repairs.yaml's targets against ``rescue``'s figures (``met`` None: no figure)."""
    out: dict[str, Any] = {}
    bound = repairs_targets.get("rescued_class_rate")
    if isinstance(bound, Mapping):
        value = res["rescued_class_rate"]
        out["rescued_class_rate"] = {"value": value, "target": bound["min"], "kind": "min",
                                     "met": None if value is None else value >= bound["min"]}
    if repairs_targets.get("healthy_change_within_spread"):
        value = res["healthy_change_within_spread"]
        out["healthy_change_within_spread"] = {"value": value, "target": True, "met": value}
    return out


def rescue_markdown(res: Mapping[str, Any]) -> list[str]:
    lines = ["", f"Rescue with the repairs on (rescued: final val AP50 >= {1 - res['rescued_within']:g} x the "
                 "reference median of the runs without):", "",
             "| class | failed without | rescued | AP50 each run without -> with | rescued? |", "|---|---|---|---|---|"]
    for cls, c in res["classes"].items():
        pairs = ", ".join(f"{_num(a)}->{_num(b)}" for a, b in c["ap50"]) or "-"
        if c.get("not_rerun"):
            pairs += f" ({len(c['not_rerun'])} not re-run: no finding a repair answers)"
        verdict = _yes(c["class_rescued"]) if c["failed"] else "n/a (no failed run)"
        lines.append(f"| {cls} | {c['failed']} of {c['runs']} | {c['rescued']} | {pairs} | {verdict} |")
    lines += ["", f"Rescued classes: {res['rescued_classes']} of {res['classes_with_failed_runs']} with a failed run "
                  f"({_pct(res['rescued_class_rate'])})."]
    lines.append("Healthy groups, mean final AP50 change with the repairs (runs not re-run count 0) vs the "
                 "seed-to-seed sd without: " + ("; ".join(
                     f"{g} {_signed_num(h['mean_change'])} (sd {_num(h['spread'], 3)}, {h['rerun']} of {h['runs']} "
                     f"re-run){'' if h['within_spread'] is not False else ' **outside**'}"
                     for g, h in res["healthy"].items()) or "none") + ".")
    if res.get("not_recorded"):
        lines.append(f"Planned with the repairs but not recorded yet ({len(res['not_recorded'])}): "
                     f"{', '.join(res['not_recorded'])}.")
    if res.get("targets") is not None:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for key, t in res["targets"].items():
            if key == "rescued_class_rate":
                lines.append(f"| {key} >= {_pct(t['target'])} | {_pct(t['value'])} | {_yes(t['met'])} |")
            else:
                shown = "n/a" if t["value"] is None else ("every group" if t["value"] else "not every group")
                lines.append(f"| {key} | {shown} | {_yes(t['met'])} |")
    else:
        lines += ["", "The repairs' targets are judged on the confirm seeds only."]
    return lines


# ------------------------------------------------------------------------------------ markdown
def markdown(report: Mapping[str, Any], spec: Any) -> str:
    seed_set = report["seed_set"]
    lines = [f"Diagnosis benchmark, spec v{spec.version} (sha256 {spec.sha256[:12]}), {seed_set} seeds "
             f"{spec.seeds[seed_set]}: {report['runs']} runs recorded"
             + (f", {len(report['stale'])} of another spec left out" if report.get("stale") else "")
             + (f", findings {report['findings_source']}" if report.get("findings_source") else "") + ".", ""]
    medians = report["scores"]["reference_medians"]
    lines.append("Outcome bars (median final val AP50 of the reference healthy runs): "
                 + (", ".join(f"{k} {v:.3f}" for k, v in sorted(medians.items())) or "none yet") + ".")
    counts: dict[str, int] = {}
    for lab in report["scores"]["labels"].values():
        counts[lab] = counts.get(lab, 0) + 1
    lines += [f"Outcomes: {', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'}.", ""]
    systems = {DETLAB: report["scores"][DETLAB], **report["scores"]["baselines"]}
    lines += ["| system | flagged (failed runs) | right first (failed, declared) | right first (nameable) | "
              "false alarms (healthy runs) | median detection (fraction of run) |", "|---|---|---|---|---|---|"]
    for name, s in systems.items():
        lines.append(f"| {name} | {_frac(s['flagged'], s['failed_runs'])} | "
                     f"{_frac(s['right_first'], s['declared_failed_runs'])} | {_pct(s['right_first_rate_nameable'])} | "
                     f"{_frac(s['false_alarms'], s['healthy_runs'])} | {_num(s['median_detect_fraction'])} |")
    d = report["scores"][DETLAB]
    n = report["scores"]["notes"]
    lines += ["", f"Notes (findings with failure: false, not alarms): on {n['healthy_with_notes']} of "
                  f"{n['healthy_runs']} healthy runs ({_pct(n['rate_on_healthy'])}), on {n['failed_with_notes']} of "
                  f"{n['failed_runs']} failed runs ({_pct(n['rate_on_failed'])}); by detector: "
                  f"{', '.join(f'{k} {v}' for k, v in n['by_detector'].items()) or 'none'}. Counted as alarms "
                  f"(the console prints them at INFO, as notes), the false-alarm rate would be "
                  f"{_pct(d['false_alarm_rate_with_notes'])}."]
    lines += ["", "| fault class | expected | runs | failed | neither / healthy | detlab flagged | detlab right | "
                  "detlab first (detector@step, each run) |", "|---|---|---|---|---|---|---|---|"]
    for cls, c in d["per_class"].items():
        lines.append(f"| {cls} | {', '.join(spec.faults[cls].expected) or 'none yet'} | {c['runs']} | {c['failed']} | "
                     f"{c['labels'].get(NEITHER, 0)} / {c['labels'].get(HEALTHY, 0)} | {c['flagged']} | {c['right']} | "
                     f"{_firsts(c)} |")
    lines += ["", "| healthy group | runs | failed / neither / healthy | final val AP50 (each run) | false alarms | "
                  "detlab first (detector@step, each run) |", "|---|---|---|---|---|---|"]
    for grp, g in d["per_healthy_group"].items():
        outcomes = " / ".join(str(g["labels"].get(lab, 0)) for lab in (FAILED, NEITHER, HEALTHY))
        lines.append(f"| {grp} | {g['runs']} | {outcomes} | {', '.join(_num(x, 3) for x in g['final_metric'])} | "
                     f"{g['false_alarms']} | {_firsts(g)} |")
    lines += ["", f"False alarms ({d['false_alarms']} of {d['healthy_runs']} healthy runs): "
                  f"{'; '.join(d['false_alarm_runs']) or 'none'}"]
    if report.get("targets") is not None:
        lines += ["", "| target | detlab | met |", "|---|---|---|"]
        for key, t in report["targets"].items():
            if key.startswith("beats_"):
                (dr, df), (br, bf) = t["value"], t["target"]
                what = ("recall >= at <= its false alarms, one strictly better" if t.get("rule") == "dominates"
                        else "higher recall at <= its false alarms")
                strict = (f" (strict reading: {_yes(t['strict'])})" if t.get("rule") == "dominates" else "")
                lines.append(f"| beats {key[6:]}: {what} | {_pct(dr)} / {_pct(df)} vs "
                             f"{_pct(br)} / {_pct(bf)} | {_yes(t['met'])}{strict} |")
            else:
                sign = ">=" if t["kind"] == "min" else "<="
                fmt = _num if key == "median_detect_fraction" else _pct
                extra = f" over {t['healthy_runs']} healthy runs" if "healthy_runs" in t else ""
                lines.append(f"| {key} {sign} {fmt(t['target'])} | {fmt(t['value'])}{extra} | {_yes(t['met'])} |")
    else:
        lines += ["", "Targets are judged on the confirm seeds only (spec rule 2)."]
    scores = report["scores"]
    lines += ["", f"Overhead against diagnosis.enabled=false: {_pct(scores['overhead'])} by wall time"
                  + (f", {_pct(scores['overhead_cpu'])} by the processes' CPU time"
                     if scores.get("overhead_cpu") is not None else "") + "."]
    pairs = scores.get("overhead_pairs") or []
    if pairs:
        def steal(value: Any) -> str:
            return f"{float(value):.1f} s" if _finite(value) else "-"

        lines += ["", "| pair | wall on / off | wall | CPU | steal on / off |", "|---|---|---|---|---|"]
        lines += [f"| {p['pair']} | {_num(p['wall_on_s'], 1)} / {_num(p['wall_off_s'], 1)} s | {_signed_pct(p['wall'])} "
                  f"| {_signed_pct(p['cpu'])} | {steal(p['steal_on_s'])} / {steal(p['steal_off_s'])} |" for p in pairs]
        lines.append("")
    if report.get("bytes_per_step") is not None:
        lines.append(f"Recordings: {report['recording_bytes']} bytes in all, {report['bytes_per_step']:.0f} bytes "
                     "per recorded step.")
    if report.get("replay_agreement"):
        a = report["replay_agreement"]
        lines.append(f"Replayed findings equal the runs' own on {a['same']} of {a['runs']} runs"
                     + (f" (different: {', '.join(a['different'])})" if a["different"] else "") + ".")
    if report.get("rescue"):
        lines += rescue_markdown(report["rescue"])
    return "\n".join(lines) + "\n"


def _firsts(row: Mapping[str, Any]) -> str:
    return ", ".join(x or "-" for x in row["first"])


def _frac(k: int, n: int) -> str:
    return "n/a" if not n else f"{100 * k / n:.0f}% ({k}/{n})"


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _signed_pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _signed_num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _num(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _yes(met: Optional[bool]) -> str:
    return "n/a" if met is None else ("yes" if met else "**missed**")
