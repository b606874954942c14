"""The repairs' pre-registration (benchmarks/diagnosis/repairs.yaml, repairs.py) and bench_diagnosis
--repairs with known answers: the file's checks, the reduced plan (given fake recordings without repairs),
and the rescue figures of --replay --repairs. Nothing is trained."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks.diagnosis import bench_diagnosis
from benchmarks.diagnosis.recording import build_record, recording_path, write_recording
from benchmarks.diagnosis.repairs import (REPAIRS_PATH, RepairsError, load_repairs, repair_plan, repairs_spec_path,
                                          switched_on_answers)
from benchmarks.diagnosis.spec import load_spec, plan_runs
from conftest import edited_copy
from detlab.run_record import read_metrics

SPEC = load_spec(repairs_spec_path())  # the spec version the repairs file rides on (2)
REPAIRS = load_repairs(SPEC)
DATA = Path(__file__).resolve().parent / "data" / "replay_frozen_backbone"


def test_the_hash_is_the_sha256_of_the_files_bytes_and_it_fits_the_spec():
    assert REPAIRS.sha256 == hashlib.sha256(REPAIRS_PATH.read_bytes()).hexdigest()
    assert REPAIRS.spec_version == SPEC.version and REPAIRS.switch == ["diagnosis.repair=true"]
    assert REPAIRS.rescued_within == 0.1
    assert set(REPAIRS.rescuable) | set(REPAIRS.not_rescuable) == set(SPEC.faults)
    assert "lr_x100" in REPAIRS.rescuable and "fp16_overflow" in REPAIRS.not_rescuable


def test_the_plan_reads_the_detectors_that_the_switched_on_repairs_answer():
    assert switched_on_answers(REPAIRS.switch) == {"avoidance", "class_loss_at_chance", "dead_gradients", "divergence",
                                                   "loss_imbalance", "stuck"}  # v2: mining on
    # without mining, the rollback still answers avoidance (v3: a run without a warm-up, or restarted)
    without_mining = switched_on_answers([*REPAIRS.switch, "diagnosis.repairs.mining.enabled=false"])
    assert without_mining == {"avoidance", "dead_gradients", "divergence", "loss_imbalance", "stuck"}
    without_both = switched_on_answers([*REPAIRS.switch, "diagnosis.repairs.mining.enabled=false",
                                        "diagnosis.repairs.rollback.enabled=false"])
    assert without_both == {"loss_imbalance", "stuck"}
    assert switched_on_answers([]) == frozenset()  # the switch off: no repair


@pytest.mark.parametrize("old,new,message", [
    ("  warmup_never_ends: a run stuck in its warm-up ends the warm-up\n", "",
     r"in neither rescuable nor not_rescuable: \['warmup_never_ends'\]"),
    ("  late_overfit:", "  late_overfitting:",
     r"neither rescuable nor not_rescuable: \['late_overfit'\]; unknown fault classes: \['late_overfitting'\]"),
    ("  paper_box_0.01: rebalancing\n", "  paper_box_0.01: rebalancing\n  paper_box_5: again\n",
     r"listed twice: \['paper_box_5'\]"),
    ("spec_version: 2", "spec_version: 1", "not the spec's version 2"),
    ("rescued_within: 0.1", "rescued_within: 1.5", "rescued_within"),
])
def test_a_repairs_file_that_breaks_its_rules_is_refused(tmp_path, old, new, message):
    with pytest.raises(RepairsError, match=message):
        load_repairs(SPEC, edited_copy(REPAIRS_PATH, tmp_path, old, new))


def test_a_class_in_both_lists_is_refused(tmp_path):
    path = edited_copy(REPAIRS_PATH, tmp_path, "  lr_tiny: an lr", "  lr_x100: twice\n  lr_tiny: an lr")
    with pytest.raises(RepairsError, match=r"both rescuable and not_rescuable: \['lr_x100'\]"):
        load_repairs(SPEC, path)


def test_a_changed_byte_is_another_hash(tmp_path):
    copy = tmp_path / "repairs.yaml"
    copy.write_bytes(REPAIRS_PATH.read_bytes() + b"# a comment\n")
    assert load_repairs(SPEC, copy).sha256 != REPAIRS.sha256


# ------------------------------------------------------------------------------------ the plan
def test_the_plan_keeps_the_runs_a_repair_may_act_on():
    answers = frozenset({"stuck", "avoidance"})
    plain = {"healthy-default-base-s4001": [],  # no finding: trains as without the switch
             "healthy-default-base-s4002": ["stuck"],  # answered
             "healthy-lr-lr0.005-s4001": ["dead_gradients", "under_confidence"],  # findings no repair answers
             "healthy-lr-lr0.02-s4001": ["random_large_boxes", "avoidance"],  # one answered is enough
             "fault-lr_tiny-s4001": ["stuck"],  # not rescuable, whatever its findings
             "fault-lr_x0.001-s4001": ["stuck"],  # rescuable and answered
             "fault-neg_pos_1to1-s4001": [],  # rescuable, but nothing a repair acts on: its own twin
             "fault-weak_mining-s4002": ["overfitting"]}  # the same
    runs = repair_plan(SPEC, REPAIRS, "confirm", plain, answers)
    every = plan_runs(SPEC, "confirm")
    names = {r.name for r in runs}
    assert {r.group for r in runs if r.kind == "fault"} == set(REPAIRS.rescuable) - {"fp16_overflow"}
    assert sum(r.kind == "fault" for r in runs) == 3 * len(REPAIRS.rescuable) - 2
    assert "fault-lr_x0.001-s4001" in names and not {"fault-neg_pos_1to1-s4001", "fault-weak_mining-s4002"} & names
    assert not [r for r in runs if r.kind == "overhead"]  # the overhead pairs are the diagnosis's
    left_out = {r.name for r in every if r.kind == "healthy"} - {r.name for r in runs if r.kind == "healthy"}
    assert left_out == {"healthy-default-base-s4001", "healthy-lr-lr0.005-s4001"}
    assert [r.name for r in runs] == [r.name for r in every if r in runs]  # spec order
    assert repair_plan(SPEC, REPAIRS, "confirm", plain, answers, gpu=True) == []  # fp16_overflow is not rescuable


PLAIN, REPAIRED = str(SPEC.version), f"{SPEC.version}-repairs"  # the recordings' folders


def committed_run() -> tuple[dict, list, list, dict, dict]:
    record = json.loads((DATA / "steps.json").read_text())
    config = OmegaConf.to_container(OmegaConf.load(DATA / "config.yaml"), resolve=True)
    return record, record["steps"], read_metrics(DATA), json.loads((DATA / "summary.json").read_text()), config


def fabricate(root: Path, version: str, seed_set: str, runs: dict[str, float], findings=None,
              sha: str = SPEC.sha256) -> None:
    """Recordings of planned runs (by name) from the committed run (its findings: dead_gradients, avoidance),
    each with its final val AP50 set and, if given, the findings the run recorded."""
    record, steps, epochs, summary, config = committed_run()
    planned = {r.name: r for r in plan_runs(SPEC, seed_set)}
    for name, ap in runs.items():
        rows = [dict(r) for r in epochs]
        rows[-1]["val/ap50"] = ap
        own = summary if findings is None else {
            **summary, "findings": [{"detector": d, "step": 10, "failure": True} for d in findings.get(name, [])]}
        rec = build_record(planned[name].to_dict(), SPEC.version, sha, 75, 25, steps, rows, own, config)
        write_recording(recording_path(root, version, name), rec)


def planned_names(text: str) -> set[str]:
    return {line.split()[0] for line in text.splitlines() if line.startswith("  ")}


def test_plan_with_repairs_reads_the_recordings_without_repairs(tmp_path, capsys):
    root = tmp_path / "rec"
    found = {"healthy-default-base-s1": ["stuck"], "healthy-lr-lr0.005-s0": ["random_large_boxes"],
             "fault-lr_tiny-s0": ["stuck"]}
    fabricate(root, PLAIN, "tune", {"healthy-default-base-s0": 0.04, "healthy-default-base-s1": 0.04,
                                  "healthy-lr-lr0.005-s0": 0.04, "fault-lr_tiny-s0": 0.0}, findings=found)
    fabricate(root, PLAIN, "tune", {"healthy-lr-lr0.005-s1": 0.04}, findings={}, sha="f" * 64)  # another spec
    args = ["--plan", "--repairs", "--recordings", str(root), "--recorded-findings"]
    assert bench_diagnosis.main(args) == 0
    text = capsys.readouterr().out
    healthy = {r.name for r in plan_runs(SPEC, "tune") if r.kind == "healthy"}
    rescuable = {r.name for r in plan_runs(SPEC, "tune") if r.kind == "fault" and r.group in REPAIRS.rescuable}
    assert planned_names(text) == rescuable | healthy - {"healthy-default-base-s0", "healthy-lr-lr0.005-s0"}
    assert REPAIRS.sha256 in text and "left out: no such finding" in text
    # the parts cut the reduced plan: every run in one of them
    assert bench_diagnosis.main([*args, "--part", "2/4", "--all-parts"]) == 0
    parts = capsys.readouterr().out
    assert "tune part 4/4" in parts and planned_names(parts) == planned_names(text)
    assert sum(line.startswith("  ") for line in parts.splitlines()) == len(planned_names(text))
    # replayed with today's detectors, the committed run finds avoidance, which a repair answers: every run planned
    assert bench_diagnosis.main(args[:-1]) == 0
    assert planned_names(capsys.readouterr().out) == rescuable | healthy


def test_a_run_with_repairs_gets_the_switch_last_of_its_own_overrides():
    run = plan_runs(SPEC, "tune")[0]
    args = argparse.Namespace(device=None, max_epochs=None)
    assert bench_diagnosis.prepared(run, args, REPAIRS).overrides == [*run.overrides, "diagnosis.repair=true"]
    assert bench_diagnosis.prepared(run, args).overrides == run.overrides


# ------------------------------------------------------------------------------------ the scoring
def test_replay_with_repairs_scores_each_run_against_its_twin(tmp_path):
    root, out = tmp_path / "rec", tmp_path / "out"
    # without repairs: the reference median 0.04 (rescued from 0.036), lr_x100 failed twice, no_mining once
    fabricate(root, PLAIN, "tune", {"healthy-default-base-s0": 0.035, "healthy-default-base-s1": 0.04,
                                  "healthy-default-base-s2": 0.045, "fault-lr_x100-s0": 0.001,
                                  "fault-lr_x100-s1": 0.002, "fault-lr_x100-s2": 0.03, "fault-no_mining-s0": 0.001})
    fabricate(root, REPAIRED, "tune", {"fault-lr_x100-s0": 0.039, "fault-lr_x100-s1": 0.037,
                                          "fault-lr_x100-s2": 0.04, "fault-no_mining-s0": 0.02,
                                          "healthy-default-base-s1": 0.05})
    assert bench_diagnosis.main(["--replay", "--repairs", "--recordings", str(root), "--out", str(out)]) == 0
    report = json.loads((out / "bench_diagnosis_tune_repairs.json").read_text())
    assert report["repairs"]["sha256"] == REPAIRS.sha256
    res = report["rescue"]
    assert {k: v for k, v in res["classes"]["lr_x100"].items() if k != "ap50"} == {
        "runs": 3, "failed": 2, "rescued": 2, "rescued_runs": ["fault-lr_x100-s0", "fault-lr_x100-s1"],
        "not_rerun": [], "class_rescued": True}
    assert res["classes"]["no_mining"]["class_rescued"] is False and res["classes"]["paper_box_10"]["runs"] == 0
    assert (res["rescued_classes"], res["classes_with_failed_runs"], res["rescued_class_rate"]) == (1, 2, 0.5)
    default = res["healthy"]["default"]  # +0.01 on one of three runs, against a spread of 0.005
    assert default["mean_change"] == pytest.approx(0.01 / 3) and default["spread"] == pytest.approx(0.005)
    assert default["within_spread"] is True and res["healthy_change_within_spread"] is True
    assert "fault-no_mining-s1" in res["not_recorded"] and "fault-lr_x100-s0" not in res["not_recorded"]
    assert res["targets"] is None  # the tune seeds are never judged
    md = (out / "bench_diagnosis_tune_repairs.md").read_text()
    assert "| lr_x100 | 2 of 3 | 2 | 0.00->0.04, 0.00->0.04, 0.03->0.04 | yes |" in md
    assert "The repairs' targets are judged on the confirm seeds only." in md


def test_replay_with_repairs_on_the_confirm_seeds_judges_the_targets(tmp_path, capsys):
    root, out = tmp_path / "rec", tmp_path / "out"
    fabricate(root, PLAIN, "confirm", {"healthy-default-base-s4001": 0.04, "healthy-default-base-s4002": 0.04,
                                     "fault-lr_x100-s4001": 0.001})
    fabricate(root, REPAIRED, "confirm", {"fault-lr_x100-s4001": 0.01})
    bench_diagnosis.main(["--replay", "--repairs", "--seed-set", "confirm", "--recordings", str(root),
                          "--out", str(out)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["repairs"]["sha256"] == REPAIRS.sha256 and last["repairs"]["rescued_class_rate"] == 0.0
    assert last["repairs"]["targets"]["rescued_class_rate"]["met"] is False
    assert last["repairs"]["targets"]["healthy_change_within_spread"]["met"] is True  # nothing re-run, sd 0
