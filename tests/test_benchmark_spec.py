"""The diagnosis benchmark's pre-registered spec (benchmarks/diagnosis/spec.yaml): it loads and holds its
own rules, its hash is the file's, it plans the runs the issue asks for, and the parts cut them
deterministically."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from conftest import edited_copy

from benchmarks.diagnosis.spec import (
    SPEC_PATH,
    SpecError,
    assign_parts,
    load_spec,
    parse_part,
    plan_runs,
)

SPEC = load_spec()
# Seeds the earlier benchmark ran (README, "Diagnosis benchmark": seeds 0-2 and 100-102, its healthy runs
# seed_offset + 0..19): never confirmation seeds.
SEEN_SEEDS = set(range(0, 20)) | set(range(100, 120))


def test_the_hash_is_the_sha256_of_the_files_bytes():
    assert SPEC.sha256 == hashlib.sha256(SPEC_PATH.read_bytes()).hexdigest()
    assert SPEC.version >= 1


def test_a_changed_byte_is_another_hash(tmp_path):
    copy = tmp_path / "spec.yaml"
    copy.write_bytes(SPEC_PATH.read_bytes() + b"# a comment\n")
    assert load_spec(copy).sha256 != SPEC.sha256


def test_confirmation_seeds_are_fresh_and_apart_from_the_tuning_seeds():
    assert not set(SPEC.seeds["confirm"]) & SEEN_SEEDS
    assert not set(SPEC.seeds["confirm"]) & set(SPEC.seeds["tune"])


def test_every_fault_says_how_it_is_injected_what_should_name_it_and_why():
    for name, f in SPEC.faults.items():
        assert f.overrides or f.inject, name
        assert f.why and f.reports, name
    assert SPEC.faults["label_noise_30"].expected == []  # "none yet", said rather than invented
    assert "none yet" in SPEC.faults["label_noise_30"].why


def test_the_issues_fault_list_is_covered():
    injections = {f.inject for f in SPEC.faults.values()}
    assert {"flipped_boxes", "zero_size_boxes", "most_images_empty", "step_skipped", "fp16_overflow",
            "label_noise"} <= injections
    overrides = [o for f in SPEC.faults.values() for o in f.overrides]
    assert "optim.lr=1e-12" in overrides and "schedule.warmup_steps=100000" in overrides  # lr 0 / lr rising
    assert "loss.neg_pos_ratio=1" in overrides
    assert {f.overrides[-1] for f in SPEC.faults.values() if f.recipe == "paper"} == {
        "loss.box_weight=10", "loss.box_weight=5", "loss.box_weight=0.2", "loss.box_weight=0.01"}
    assert SPEC.faults["fp16_overflow"].gpu_only
    assert SPEC.faults["late_overfit"].expected == ["overfitting"]


@pytest.mark.parametrize("seed_set", ["tune", "confirm"])
def test_the_healthy_set_has_30_runs_with_6_full_default_and_6_wider_runs(seed_set):
    runs = plan_runs(SPEC, seed_set)
    healthy = [r for r in runs if r.kind == "healthy"]
    assert len(healthy) >= 30
    default = [r for r in healthy if r.group == "default"]
    assert len(default) >= 6 and all("train.epochs=15" in r.overrides for r in default)
    assert sum(r.recipe == "wider_short" for r in healthy) >= 6
    assert any(r.inject == "frozen_backbone" and r.recipe == "synthetic_finetune" for r in healthy)
    box = {o for r in healthy for o in r.overrides if o.startswith("loss.box_weight=")}
    assert {float(o.split("=")[1]) for o in box} <= {0.2, 0.5, 2.0} and len(box) >= 2
    names = [r.name for r in runs]
    assert len(names) == len(set(names))


def test_gpu_only_classes_are_planned_apart():
    cpu, gpu = plan_runs(SPEC, "tune"), plan_runs(SPEC, "tune", gpu=True)
    assert {r.group for r in gpu} == {"fp16_overflow"} and all(r.gpu_only for r in gpu)
    assert not any(r.gpu_only for r in cpu)
    assert len(plan_runs(SPEC, "tune", gpu=None)) == len(cpu) + len(gpu)


def test_overhead_pairs_run_on_the_confirm_seeds_only():
    assert not [r for r in plan_runs(SPEC, "tune") if r.kind == "overhead"]
    pairs = [r for r in plan_runs(SPEC, "confirm") if r.kind == "overhead"]
    assert Counter(r.variant for r in pairs) == {"on": 12, "off": 12}  # v6: 12 pairs (versions 3-5: 6)
    assert all(f"diagnosis.enabled={'true' if r.variant == 'on' else 'false'}" in r.overrides for r in pairs)
    # v3: order abba, so a drift in time favours neither side; they run last, in that order
    timed = [r.variant for r in assign_parts(plan_runs(SPEC, "confirm"), 4)[-1] if r.kind == "overhead"]
    assert timed == ["off", "on", "on", "off"] * 6


def test_overhead_pairs_of_an_older_spec_run_off_then_on(tmp_path):
    old = load_spec(edited_copy(SPEC_PATH, tmp_path, "  order: abba\n", ""))
    timed = [r.variant for r in assign_parts(plan_runs(old, "confirm"), 2)[-1] if r.kind == "overhead"]
    assert timed == ["off", "on"] * 12


@pytest.mark.slow  # several seconds: kept out of the quick loop
def test_every_run_composes_and_is_long_enough_for_the_baselines():
    """Each distinct config composes and validates; every run validates at least 6 times, so Lightning's
    patience (3 validations) can run out and AUTOTRAINER's first judged check (30% of the epochs) holds 2
    points or more."""
    from detlab.config import compose_config

    seen = {}
    for run in plan_runs(SPEC, "tune", gpu=None):
        key = tuple(o for o in run.overrides if not o.startswith("train.seed="))
        if key not in seen:
            seen[key] = compose_config(overrides=list(key)).train.epochs
        assert seen[key] >= 6, run.name


def test_the_recipes_of_the_faults_have_reference_runs_in_each_seed_set():
    for seed_set in ("tune", "confirm"):
        references = {r.recipe for r in plan_runs(SPEC, seed_set) if r.kind == "healthy" and r.reference}
        assert {f.recipe for f in SPEC.faults.values()} <= references


def test_baseline_rules_name_classes_as_detlabs_detectors_do():
    """The same classes for the same pattern: the stall, the blow-up, no gradient, overfitting."""
    stuck = {c for c, f in SPEC.faults.items() if "stuck" in f.expected}
    divergence = {c for c, f in SPEC.faults.items() if "divergence" in f.expected}
    assert set(SPEC.rule_classes("sagemaker_loss_not_decreasing", "loss_not_decreasing")) == stuck
    assert set(SPEC.rule_classes("autotrainer", "slow_convergence")) == stuck
    assert set(SPEC.rule_classes("torchvision_nonfinite_loss", "nonfinite_loss")) == divergence
    assert set(SPEC.rule_classes("lightning_early_stopping", "check_finite")) == divergence
    assert SPEC.rule_classes("autotrainer", "dying_relu") == ["frozen_backbone"]
    assert SPEC.rule_classes("sagemaker_overfit", "overfit") == ["late_overfit"]
    assert SPEC.rule_classes("autotrainer", "no_such_rule") == []


@pytest.mark.parametrize("old,new,message", [
    ("confirm: [8001,", "confirm: [5,", "apart"),
    ('"dead_gradients:killed"]', '"dead_gradients:frozen"]', "unknown expected detectors"),  # not one of its variants
    ("  order: abba\n", "  order: shuffled\n", "overhead.order"),
    ("expected: [overfitting]", "expected: [overfit]", "unknown expected detectors"),
    ("inject: step_skipped", "inject: skip_step", "unknown injection"),
    ("classes: [late_overfit]", "classes: [late_overfitting]", "unknown classes"),
    ("recipe: paper\n    overrides: [loss.box_weight=10]", "recipe: papers\n    overrides: [loss.box_weight=10]",
     "unknown recipe"),
])
def test_a_spec_that_breaks_its_rules_is_refused(tmp_path, old, new, message):
    with pytest.raises(SpecError, match=message):
        load_spec(edited_copy(SPEC_PATH, tmp_path, old, new))


@pytest.mark.parametrize("n", [1, 3, 8, 40])
def test_parts_are_deterministic_disjoint_and_about_equal(n):
    runs = plan_runs(SPEC, "confirm")
    parts = assign_parts(runs, n)
    again = assign_parts(list(reversed(runs)), n)
    assert [[r.name for r in p] for p in parts] == [[r.name for r in p] for p in again]
    names = [r.name for p in parts for r in p]
    assert sorted(names) == sorted(r.name for r in runs)
    loads = [sum(r.minutes for r in p if r.kind != "overhead") for p in parts]
    assert max(loads) - min(loads) <= max(r.minutes for r in runs)
    assert all(r.kind == "overhead" for p in parts[:-1] for r in p if r.kind == "overhead")
    assert {r.name for r in parts[-1] if r.kind == "overhead"} == {r.name for r in runs if r.kind == "overhead"}


@pytest.mark.parametrize("text,expected", [("3/40", (3, 40)), (" 1 / 1 ", (1, 1))])
def test_parse_part(text, expected):
    assert parse_part(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "3", "a/b"])
def test_parse_part_refuses(text):
    with pytest.raises(ValueError):
        parse_part(text)


def test_the_launcher_threads_check_requirements_at_the_same_time():
    """A part launches its runs from threads, each composing its run's config to see what it needs; Hydra's
    compose state is global, and two at once raised "GlobalHydra is already initialized"."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.diagnosis.bench_diagnosis import missing_requirements

    runs = [r for r in plan_runs(SPEC, "tune") if r.requires][:8]
    assert len(runs) == 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(missing_requirements, runs))
    assert all(isinstance(answer, list) for answer in answers)
