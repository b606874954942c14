"""The diagnosis benchmark's scoring (benchmarks/diagnosis/scoring.py) with known answers: outcome labels
from the runs' records, detection against the outcome, the right first diagnosis against the declared
class, the notes on their own, the detection fraction, the baselines' rule-to-class map, the targets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from benchmarks.diagnosis.scoring import (
    ERROR,
    FAILED,
    HEALTHY,
    NEITHER,
    UNKNOWN,
    Alarm,
    RunResult,
    beats,
    first_failure,
    markdown,
    matches,
    outcome_labels,
    overhead,
    overhead_pairs,
    reference_medians,
    rescue,
    rescue_markdown,
    rescue_targets,
    rescued,
    score_all,
    targets,
)
from benchmarks.diagnosis.spec import FaultClass, OutcomeRule


def run(name, kind="fault", group="g", ap=None, recipe="r", seed_set="tune", reference=False, status="completed",
        expected=(), findings=(), baselines=None, total=100, loss=1.0, variant="", wall=None) -> RunResult:
    return RunResult(name=name, kind=kind, group=group, recipe=recipe, seed_set=seed_set, variant=variant,
                     reference=reference, expected=list(expected), status=status, final_metric=ap,
                     final_train_loss=loss, total_steps=total,
                     findings=[{"detector": d, "step": s, "failure": f} for d, s, f in findings],
                     baselines=baselines or {}, wall_time_s=wall)


def ref(name, ap, seed_set="tune", recipe="r"):
    return run(name, kind="healthy", group="default", ap=ap, recipe=recipe, seed_set=seed_set, reference=True)


# Reference APs 0.4, 0.5, 0.6: median 0.5, so failed < 0.25 <= neither < 0.4 <= healthy (exact in binary).
REFS = [ref("h1", 0.4), ref("h2", 0.5), ref("h3", 0.6)]


@pytest.mark.parametrize("result,label", [
    (run("a", ap=0.2499), FAILED),
    (run("b", ap=0.25), NEITHER),  # exactly half the median: not under it
    (run("c", ap=0.3999), NEITHER),
    (run("d", ap=0.4), HEALTHY),  # exactly 80%
    (run("e", ap=0.55, status="diverged"), FAILED),  # diverged, whatever its last AP50
    (run("f", ap=0.55, loss=math.nan), FAILED),  # a non-finite final training loss
    (run("g", ap=0.55, status="failed"), ERROR),  # crashed
    (run("h", ap=None), UNKNOWN),
    (run("i", ap=math.nan), UNKNOWN),
    (run("j", ap=0.9, recipe="other"), UNKNOWN),  # no reference runs of its recipe
    (run("k", ap=0.9, seed_set="confirm"), UNKNOWN),  # the bar of its own seed set only
    (run("l", ap=0.1, kind="healthy", group="lr"), FAILED),  # a healthy-declared run can fail
])
def test_outcome_labels(result, label):
    labels = outcome_labels([*REFS, result], OutcomeRule())
    assert labels[result.name] == label
    assert labels["h1"] == labels["h2"] == labels["h3"] == HEALTHY


def test_reference_medians_per_recipe_and_seed_set():
    results = [*REFS, ref("c1", 0.5, "confirm"), ref("c2", 0.7, "confirm"), ref("w", 0.3, recipe="wider"),
               run("x", kind="healthy", ap=0.1, reference=False), ref("nan", math.nan)]
    assert reference_medians(results) == {("r", "tune"): 0.5, ("r", "confirm"): 0.6, ("wider", "tune"): 0.3}


def test_first_failure_skips_notes():
    findings = [{"detector": "under_confidence", "step": 5, "failure": False},
                {"detector": "stuck", "step": 9, "failure": True}, {"detector": "divergence", "step": 9}]
    assert first_failure(findings).name == "stuck" and first_failure(findings).step == 9
    assert first_failure(findings[:1]) is None


SPEC = SimpleNamespace(
    outcome=OutcomeRule(),
    faults={"slow": FaultClass("slow", "r", [], None, ["stuck"], "why", "r", 3),
            "blowup": FaultClass("blowup", "r", [], None, ["divergence"], "why", "r", 3),
            "noise": FaultClass("noise", "r", [], "label_noise", [], "none yet", "r", 3)},
    baseline_rules={"tool.flat": ["slow"], "tool.nan": ["blowup"]},
    targets={"flagged_rate": {"min": 0.95}, "right_first_rate": {"min": 0.85}, "false_alarm_rate": {"max": 0.03},
             "min_healthy_runs": 4, "median_detect_fraction": {"max": 0.10}, "overhead": {"max": 0.03},
             "beats_baselines": True},
)
SPEC.rule_classes = lambda baseline, rule: SPEC.baseline_rules.get(f"{baseline}.{rule}", [])

# 3 references (healthy), 2 healthy variants, 6 fault runs: 5 failed, 1 healthy.
RESULTS = [
    *REFS,
    run("lr", kind="healthy", group="lr", ap=0.85, findings=[("under_confidence", 90, False)],
        baselines={"tool": {"rule": "flat", "step": 50}}),  # a note only: no false alarm; the tool's is one
    run("b16", kind="healthy", group="b16", ap=0.74, findings=[("random_large_boxes", 25, True)]),  # a false alarm
    run("slow1", group="slow", expected=["stuck"], ap=0.1, findings=[("stuck", 20, True)],
        baselines={"tool": {"rule": "flat", "step": 40}}),  # right, at 0.2
    run("slow2", group="slow", expected=["stuck"], ap=0.1, findings=[("avoidance", 50, True), ("stuck", 60, True)],
        baselines={"tool": {"rule": "nan", "step": 90}}),  # flagged, wrong first (both)
    run("blow1", group="blowup", expected=["divergence"], ap=0.9, status="diverged", total=200,
        findings=[("divergence", 20, True)], baselines={"tool": {"rule": "nan", "step": 20}}),  # right, at 0.1
    run("blow2", group="blowup", expected=["divergence"], ap=0.88, findings=[("divergence", 5, True)],
        baselines={"tool": None}),  # healthy by outcome: its finding is a false alarm
    run("noise1", group="noise", expected=[], ap=0.2, findings=[("under_confidence", 99, False)]),  # missed (a note)
    run("noise2", group="noise", expected=[], ap=0.2, findings=[("stuck", 80, True)]),  # flagged, nothing is right
    run("ovh", kind="overhead", group="overhead", ap=0.01, findings=[("stuck", 1, True)]),  # never scored
]


def test_detlab_scores_with_known_answers():
    report = score_all(RESULTS, SPEC)
    d = report["detlab"]
    # failed: slow1, slow2, blow1, noise1, noise2 (5); healthy: h1-3, lr, b16, blow2 (6)
    assert (d["failed_runs"], d["healthy_runs"], d["declared_failed_runs"]) == (5, 6, 5)
    assert d["flagged"] == 4 and d["flagged_rate"] == pytest.approx(4 / 5)  # noise1 has a note only
    assert d["false_alarms"] == 2 and d["false_alarm_rate"] == pytest.approx(2 / 6)  # b16, blow2
    assert d["right_first"] == 2 and d["right_first_rate"] == pytest.approx(2 / 5)  # slow1, blow1
    assert d["right_first_rate_nameable"] == pytest.approx(2 / 3)  # noise has no expected detector
    # first failure's step / planned steps: slow1 20/100, slow2 50/100, blow1 20/200, noise2 80/100
    assert d["median_detect_fraction"] == pytest.approx((0.2 + 0.5) / 2)
    assert d["false_alarm_rate_with_notes"] == pytest.approx(3 / 6)  # lr's note counted too
    assert d["per_class"]["slow"] == {"runs": 2, "failed": 2, "labels": {FAILED: 2}, "flagged": 2, "right": 1,
                                      "first": ["stuck@20", "avoidance@50"], "false_alarms": 0}
    assert d["per_class"]["blowup"]["labels"] == {FAILED: 1, HEALTHY: 1}
    assert d["per_class"]["blowup"]["false_alarms"] == 1
    # the healthy-declared runs, per group (the references are group "default"; overhead runs never count)
    assert set(d["per_healthy_group"]) == {"default", "lr", "b16"}
    assert d["per_healthy_group"]["default"] == {"runs": 3, "labels": {HEALTHY: 3}, "final_metric": [0.4, 0.5, 0.6],
                                                 "false_alarms": 0, "first": [None, None, None]}
    assert d["per_healthy_group"]["lr"]["first"] == [None]  # its note is not an alarm
    assert d["per_healthy_group"]["b16"] == {"runs": 1, "labels": {HEALTHY: 1}, "final_metric": [0.74],
                                             "false_alarms": 1, "first": ["random_large_boxes@25"]}
    notes = report["notes"]
    assert (notes["healthy_with_notes"], notes["healthy_runs"], notes["failed_with_notes"]) == (1, 6, 1)
    assert notes["by_detector"] == {"under_confidence": 2}
    assert report["classes_without_detector"] == ["noise"]


def test_the_report_has_a_row_per_healthy_group():
    spec = SimpleNamespace(**vars(SPEC), version=1, sha256="0" * 64, seeds={"tune": [0, 1]})
    report = {"seed_set": "tune", "runs": len(RESULTS), "stale": [], "scores": score_all(RESULTS, SPEC),
              "targets": None}
    table = markdown(report, spec)
    assert "| b16 | 1 | 0 / 0 / 1 | 0.740 | 1 | random_large_boxes@25 |" in table
    assert "| default | 3 | 0 / 0 / 3 | 0.400, 0.500, 0.600 | 0 | -, -, - |" in table
    assert "| overhead |" not in table


def test_a_baseline_is_right_when_the_spec_maps_its_rule_to_the_class():
    b = score_all(RESULTS, SPEC)["baselines"]["tool"]
    assert (b["flagged"], b["false_alarms"], b["right_first"]) == (3, 1, 2)  # right: slow1 (flat), blow1 (nan)
    assert b["flagged_rate"] == pytest.approx(3 / 5) and b["false_alarm_rate"] == pytest.approx(1 / 6)
    assert b["right_first_rate_nameable"] == pytest.approx(2 / 3)  # slow and blowup runs are nameable by it
    assert b["median_detect_fraction"] == pytest.approx(0.4)  # 0.4, 0.9, 0.1


def test_targets_and_the_baseline_comparison():
    report = score_all(RESULTS, SPEC)
    t = targets(report, SPEC.targets)
    assert t["flagged_rate"] == {"value": pytest.approx(0.8), "target": 0.95, "kind": "min", "met": False}
    assert t["median_detect_fraction"]["met"] is False
    assert t["false_alarm_rate"]["healthy_runs"] == 6 and t["false_alarm_rate"]["met"] is False
    assert t["overhead"]["met"] is None  # no overhead runs recorded
    # detlab: 80% flagged at 33% false alarms; the tool: 60% at 17%: higher recall, but more false alarms
    assert t["beats_tool"]["met"] is False


def test_an_expected_variant_matches_that_variant_only():
    # spec v3: dead gradients after too-large updates names a too-high rate; the frozen variant does not
    expected = ["divergence", "stuck", "dead_gradients:killed"]
    assert matches(Alarm("dead_gradients", 40, "killed"), expected)
    assert not matches(Alarm("dead_gradients", 40, ""), expected)
    assert matches(Alarm("stuck", 74, "whatever"), expected)  # a detector's name matches any of its variants
    assert not matches(Alarm("avoidance", 40, "killed"), expected)
    findings = [{"detector": "dead_gradients", "kind": "killed", "step": 45, "failure": True}]
    assert first_failure(findings) == Alarm("dead_gradients", 45, "killed")
    assert first_failure([{"detector": "stuck", "step": 5}]).kind == ""  # recordings before v3 have no kind


@pytest.mark.parametrize("figures,strict,dominates", [
    ((0.9, 0.02, 0.8, 0.02), True, True),  # higher recall at the same false alarms
    ((1.0, 0.0, 1.0, 0.29), False, True),  # AUTOTRAINER on v2's confirm seeds: 100% cannot be exceeded
    ((1.0, 0.0, 1.0, 0.0), False, False),  # the same on both: not beaten
    ((1.0, 0.017, 0.0, 0.0), False, False),  # more false alarms than a rule that never fires: not beaten
    ((1.0, 0.0, 0.0, 0.0), True, True),
    ((0.7, 0.0, 0.8, 0.3), False, False),  # fewer false alarms but lower recall
])
def test_beating_a_baseline(figures, strict, dominates):
    assert beats(*figures, dominates=False) is strict and beats(*figures, dominates=True) is dominates


def test_the_false_alarm_target_needs_enough_healthy_runs():
    quiet = [r for r in RESULTS if r.name not in ("b16", "blow2")]
    report = score_all(quiet, SPEC)
    assert report["detlab"]["false_alarm_rate"] == 0.0 and report["detlab"]["healthy_runs"] == 4
    assert targets(report, SPEC.targets)["false_alarm_rate"]["met"] is True
    assert targets(report, {**SPEC.targets, "min_healthy_runs": 30})["false_alarm_rate"]["met"] is False


def test_overhead_is_the_median_ratio_minus_one():
    runs = [run(f"on{k}", kind="overhead", variant="on", wall=w) for k, w in enumerate([110.0, 100.0, 130.0])]
    runs += [run(f"off{k}", kind="overhead", variant="off", wall=w) for k, w in enumerate([100.0, 90.0, 100.0])]
    assert overhead(runs) == pytest.approx(110.0 / 100.0 - 1)
    assert overhead(runs[:3]) is None


def test_the_overhead_by_cpu_time_and_pair_by_pair():
    """v6: each recording keeps its process's CPU time and the machine's steal time; the pairs match by index."""
    def timed(name, variant, wall, user, system, steal):
        r = run(name, kind="overhead", variant=variant, wall=wall)
        r.process = {"cpu_user_s": user, "cpu_system_s": system, "machine_steal_s": steal}
        return r

    runs = [timed("overhead-on-0", "on", 110.0, 190.0, 10.0, 1.0), timed("overhead-off-0", "off", 100.0, 180.0, 20.0, 5.0),
            timed("overhead-on-1", "on", 99.0, 204.0, 6.0, 0.0), timed("overhead-off-1", "off", 100.0, 196.0, 4.0, None)]
    assert runs[0].cpu_time_s == 200.0
    assert overhead(runs, "cpu_time_s") == pytest.approx(205.0 / 200.0 - 1)  # medians 205 and 200
    pairs = overhead_pairs(runs)
    assert [p["pair"] for p in pairs] == [0, 1]
    assert pairs[0]["wall"] == pytest.approx(0.10) and pairs[0]["cpu"] == pytest.approx(0.0)
    assert pairs[1]["wall"] == pytest.approx(-0.01) and pairs[1]["cpu"] == pytest.approx(0.05)
    assert (pairs[0]["steal_on_s"], pairs[0]["steal_off_s"], pairs[1]["steal_off_s"]) == (1.0, 5.0, None)
    # a recording without process times (before v6): no CPU figure, the wall figure as before
    old = [run("overhead-on-0", kind="overhead", variant="on", wall=110.0),
           run("overhead-off-0", kind="overhead", variant="off", wall=100.0)]
    assert overhead(old, "cpu_time_s") is None and overhead_pairs(old)[0]["cpu"] is None


REPAIRS = SimpleNamespace(rescuable={"a": "why", "b": "why", "c": "why"}, rescued_within=0.1,
                          targets={"rescued_class_rate": {"min": 0.5}, "healthy_change_within_spread": True})


@pytest.mark.parametrize("result,saved", [
    (run("x", ap=0.45), True),  # exactly 90% of the median 0.5 (0.9 x 0.5 == 0.45 in binary)
    (run("x", ap=0.4499), False),
    (run("x", ap=0.9, status="failed"), False),  # a crashed run has no final AP50
    (run("x", ap=math.nan), False),
    (run("x", ap=0.9, recipe="other"), False),  # no bar for its recipe
])
def test_rescued_within_ten_percent_of_the_reference_median(result, saved):
    assert rescued(result, reference_medians(REFS), 0.1) is saved


def test_a_class_is_rescued_when_more_than_half_its_failed_runs_are():
    plain = [*REFS, run("a1", group="a", ap=0.1), run("a2", group="a", ap=0.1), run("a3", group="a", ap=0.2),
             run("b1", group="b", ap=0.1), run("b2", group="b", ap=0.0),
             run("c1", group="c", ap=0.45), run("c2", group="c", ap=0.5),  # c never failed
             run("a4", group="a", ap=0.1)]  # no repaired twin: not counted
    repaired = [run("a1", group="a", ap=0.45), run("a2", group="a", ap=0.6), run("a3", group="a", ap=0.4499),
                run("b1", group="b", ap=0.5), run("b2", group="b", ap=0.3),
                run("c1", group="c", ap=0.9), run("c2", group="c", ap=0.9)]
    r = rescue(repaired, plain, SPEC, REPAIRS)
    a, b, c = r["classes"]["a"], r["classes"]["b"], r["classes"]["c"]
    assert (a["runs"], a["failed"], a["rescued"], a["class_rescued"]) == (3, 3, 2, True)  # 2 of 3
    assert a["rescued_runs"] == ["a1", "a2"] and a["ap50"][0] == [0.1, 0.45]
    assert (b["failed"], b["rescued"], b["class_rescued"]) == (2, 1, False)  # 1 of 2 is not more than half
    assert (c["failed"], c["rescued"], c["class_rescued"]) == (0, 0, False)
    # c has no failed run: out of the denominator
    assert (r["rescued_classes"], r["classes_with_failed_runs"], r["rescued_class_rate"]) == (1, 2, 0.5)
    t = rescue_targets(r, REPAIRS.targets)
    assert t["rescued_class_rate"] == {"value": 0.5, "target": 0.5, "kind": "min", "met": True}
    # a4 not re-run because no finding of its was one a repair answers: it trains as its twin, failed again
    r = rescue(repaired, plain, SPEC, REPAIRS, identical=["a4", "c1"])
    a = r["classes"]["a"]
    assert (a["runs"], a["failed"], a["rescued"], a["class_rescued"]) == (4, 4, 2, False)  # 2 of 4: not more than half
    assert a["ap50"][-1] == [0.1, 0.1] and a["not_rerun"] == ["a4"]
    assert r["classes"]["c"]["not_rerun"] == []  # c1 was re-run: its repaired run counts
    assert "(1 not re-run: no finding a repair answers)" in "\n".join(rescue_markdown(r))


def test_the_healthy_groups_change_against_their_spread():
    lr = [run("lr1", kind="healthy", group="lr", ap=0.5), run("lr2", kind="healthy", group="lr", ap=0.52)]
    plain = [*REFS, *lr, run("b16", kind="healthy", group="b16", ap=0.5)]
    # h2 re-run (+0.06 over 3 runs: +0.02, under the sd 0.1); lr1 re-run (+0.06 over 2: +0.03, over sd 0.014)
    repaired = [ref("h2", 0.56), run("lr1", kind="healthy", group="lr", ap=0.56)]
    h = rescue(repaired, plain, SPEC, REPAIRS)["healthy"]
    assert h["default"]["mean_change"] == pytest.approx(0.02) and h["default"]["spread"] == pytest.approx(0.1)
    assert (h["default"]["runs"], h["default"]["rerun"], h["default"]["within_spread"]) == (3, 1, True)
    assert h["lr"]["mean_change"] == pytest.approx(0.03) and h["lr"]["spread"] == pytest.approx(0.02 ** 0.5 / 10)
    assert h["lr"]["within_spread"] is False
    # one run, not re-run: no spread, but no change either (identical by construction)
    assert h["b16"] == {"runs": 1, "rerun": 0, "mean_change": 0.0, "spread": None, "within_spread": True}
    r = rescue(repaired, plain, SPEC, REPAIRS)
    assert r["healthy_change_within_spread"] is False
    assert rescue_targets(r, REPAIRS.targets)["healthy_change_within_spread"]["met"] is False
    # a change where the spread is unknown (one run) cannot be judged
    r = rescue([run("b16", kind="healthy", group="b16", ap=0.6)], plain, SPEC, REPAIRS)
    assert r["healthy"]["b16"]["within_spread"] is None and r["healthy_change_within_spread"] is None
    assert r["healthy"]["lr"]["within_spread"] is True  # nothing of lr re-run: 0 change
