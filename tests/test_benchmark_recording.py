"""The diagnosis benchmark's compact recordings (benchmarks/diagnosis/recording.py) and its --replay over
them (bench_diagnosis.py), on the committed run of tests/data/replay_frozen_backbone: nothing is trained."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks.diagnosis import bench_diagnosis
from benchmarks.diagnosis.recording import (
    CONFIG_SECTIONS,
    build_record,
    bytes_per_step,
    from_columns,
    list_recordings,
    read_recording,
    recording_path,
    to_columns,
    write_recording,
)
from benchmarks.diagnosis.spec import SPEC_PATH, load_spec, plan_runs
from conftest import edited_copy
from detlab.config import compose_config
from detlab.diagnosis.replay import replay_findings
from detlab.run_record import read_metrics

DATA = Path(__file__).resolve().parent / "data" / "replay_frozen_backbone"
SPEC = load_spec()
C1, C2 = SPEC.seeds["confirm"][:2]  # the current version's first confirm seeds


def committed_run() -> tuple[dict, list, list, dict, dict]:
    record = json.loads((DATA / "steps.json").read_text())
    config = OmegaConf.to_container(OmegaConf.load(DATA / "config.yaml"), resolve=True)
    return record, record["steps"], read_metrics(DATA), json.loads((DATA / "summary.json").read_text()), config


def test_columns_round_trip_keeps_missing_keys_missing_and_nan_nan():
    rows = [{"step": 0, "a": 1.5, "b": math.nan}, {"step": 1, "c": math.inf}, {"step": 2, "a": 0.0}]
    table = to_columns(rows)
    assert table["columns"] == ["step", "a", "b", "c"]
    back = from_columns(json.loads(json.dumps(table)))
    assert back[1] == {"step": 1, "c": math.inf} and back[2] == {"step": 2, "a": 0.0}
    assert math.isnan(back[0]["b"]) and set(back[0]) == {"step", "a", "b"}


def test_a_recording_round_trips_and_replays_to_the_runs_findings(tmp_path):
    record, steps, epochs, summary, config = committed_run()
    rec = build_record({"name": "frozen"}, 1, "0" * 64, record["total_steps"], 25, steps, epochs, summary, config)
    path = recording_path(tmp_path, 1, "frozen")
    size = write_recording(path, rec)
    assert path == tmp_path / "v1" / "frozen.json.gz" and size == path.stat().st_size
    assert gzip.decompress(path.read_bytes())[:1] == b"{"  # gzip'd JSON
    back = read_recording(path)
    assert back.steps == steps and back.total_steps == 75 and back.steps_per_epoch == 25
    assert [{k: r[k] for k in ("epoch", "step")} for r in back.epochs] == [{k: r[k] for k in ("epoch", "step")}
                                                                          for r in epochs]
    assert set(back.config) <= set(CONFIG_SECTIONS)
    own = back.replay_config()  # the run's own diagnosis block (saved before version 2: judged as then)
    found = [(f.detector, f.step) for f in replay_findings(own, back.steps, back.epochs, back.total_steps)]
    assert found == [(f["detector"], f["step"]) for f in summary["findings"]] == [("dead_gradients", 10),
                                                                                  ("avoidance", 50)]
    # today's diagnosis (version 2) on the same signals: AP50 rose 0.0036 over epochs 1-3 (0.00014, 0.0012,
    # 0.0038), climbing out of chance by two validations, so no avoidance; the class loss per kept anchor sat
    # 2-5% above chance from half the run, outside class_loss_at_chance's 3% band at first
    cfg = back.replay_config(compose_config().diagnosis)
    today = [(f.detector, f.step) for f in replay_findings(cfg, back.steps, back.epochs, back.total_steps)]
    assert today == [("dead_gradients", 10)]
    # the same bytes again (no timestamp in the gzip header): a recording is stable in git
    assert write_recording(tmp_path / "again.json.gz", rec) == size
    assert (tmp_path / "again.json.gz").read_bytes() == path.read_bytes()


def test_a_recording_keeps_its_process_times(tmp_path):
    """v6: the worker adds the run's process CPU time and the machine's steal time over the run (``process``);
    a recording without them reads as empty."""
    record, steps, epochs, summary, config = committed_run()
    times = bench_diagnosis.process_times(bench_diagnosis.machine_steal_seconds())
    assert times["cpu_user_s"] > 0 and times["cpu_system_s"] >= 0
    steal = times["machine_steal_s"]  # None where /proc/stat does not say (not Linux)
    assert steal is None or steal >= 0
    assert bench_diagnosis.process_times(None)["machine_steal_s"] is None
    path = recording_path(tmp_path, 6, "timed")
    write_recording(path, build_record({"name": "timed"}, 6, "0" * 64, record["total_steps"], 25, steps, epochs,
                                       summary, config, extra={"process": times}))
    assert read_recording(path).process == times
    write_recording(path, build_record({"name": "timed"}, 6, "0" * 64, record["total_steps"], 25, steps, epochs,
                                       summary, config))
    assert read_recording(path).process == {}


def test_a_recording_weighs_under_a_hundred_bytes_a_step(tmp_path):
    """The committed run's signals, as the benchmark writes them: about 90 bytes per step (its steps.json
    takes 340)."""
    record, steps, epochs, summary, config = committed_run()
    rec = build_record({"name": "frozen"}, 1, "0" * 64, 75, 25, steps, epochs, summary, config)
    write_recording(tmp_path / "r.json.gz", rec)
    per_step = bytes_per_step([read_recording(tmp_path / "r.json.gz")])
    assert 40 < per_step < 100
    assert (DATA / "steps.json").stat().st_size / len(steps) > 3 * per_step


def test_a_file_of_another_format_is_refused(tmp_path):
    (tmp_path / "x.json.gz").write_bytes(gzip.compress(b'{"format": "other"}'))
    with pytest.raises(ValueError, match="not a detlab-diagnosis-recording"):
        read_recording(tmp_path / "x.json.gz")


def fabricate(root: Path, seed_set: str, runs: dict[str, float], sha: str = SPEC.sha256, version: int = SPEC.version,
              shortened: bool = False) -> None:
    """Recordings of planned runs (by name) from the committed run, each with its final val AP50 set (under
    0.05, where under_confidence stays quiet, so a replay finds what the run found)."""
    record, steps, epochs, summary, config = committed_run()
    planned = {r.name: r for r in plan_runs(SPEC, seed_set)}
    for name, ap in runs.items():
        rows = [dict(r) for r in epochs]
        rows[-1]["val/ap50"] = ap
        rec = build_record(planned[name].to_dict(), version, sha, 75, 25, steps, rows, summary, config, shortened)
        write_recording(recording_path(root, version, name), rec)


def test_replay_scores_the_recordings_of_the_current_spec(tmp_path):
    root, out = tmp_path / "rec", tmp_path / "out"
    fabricate(root, "tune", {"healthy-default-base-s0": 0.035, "healthy-default-base-s1": 0.04,
                             "healthy-default-base-s2": 0.045, "fault-frozen_backbone-s0": 0.01,
                             "healthy-lr-lr0.005-s0": 0.035})
    fabricate(root, "tune", {"healthy-default-base-s3": 0.04}, sha="f" * 64)  # recorded under another spec
    fabricate(root, "confirm", {f"healthy-default-base-s{C1}": 0.04})  # another seed set
    assert len(list_recordings(root, SPEC.version)) == 7
    assert bench_diagnosis.main(["--replay", "--recordings", str(root), "--out", str(out)]) == 0
    report = json.loads((out / "bench_diagnosis_tune.json").read_text())
    assert report["spec"] == {"version": SPEC.version, "sha256": SPEC.sha256, "path": SPEC.path}
    assert report["runs"] == 5 and report["stale"] == ["healthy-default-base-s3"]
    # the committed run was recorded by the diagnosis before version 2: today's finds no avoidance at step 50
    # (test_a_recording_round_trips_and_replays_to_the_runs_findings)
    assert report["replay_agreement"] == {"runs": 5, "same": 0, "different": [
        "fault-frozen_backbone-s0", "healthy-default-base-s0", "healthy-default-base-s1", "healthy-default-base-s2",
        "healthy-lr-lr0.005-s0"]}
    scores = report["scores"]
    assert scores["reference_medians"] == {"synthetic_default/tune": 0.04}
    assert scores["labels"]["fault-frozen_backbone-s0"] == "failed"
    d = scores["detlab"]
    # every recording carries the frozen run's findings: dead_gradients at step 10, first
    assert (d["failed_runs"], d["flagged"], d["right_first"]) == (1, 1, 1)
    assert (d["healthy_runs"], d["false_alarms"]) == (4, 4)
    # replayed at today's gradient sampling (every 5 steps in the first part, as the run sampled): step 10
    assert d["median_detect_fraction"] == pytest.approx(10 / 75)
    assert set(scores["baselines"]) == {"autotrainer", "sagemaker_loss_not_decreasing", "sagemaker_overfit",
                                        "lightning_early_stopping", "torchvision_nonfinite_loss"}
    assert report["targets"] is None  # the tune seeds are never judged
    assert report["bytes_per_step"] == pytest.approx(report["recording_bytes"] / (5 * 75))
    md = (out / "bench_diagnosis_tune.md").read_text()
    assert "Targets are judged on the confirm seeds only" in md and SPEC.sha256[:12] in md


def test_replay_with_overrides_and_with_the_recorded_findings(tmp_path):
    root, out = tmp_path / "rec", tmp_path / "out"
    fabricate(root, "tune", {"healthy-default-base-s0": 0.04, "fault-frozen_backbone-s0": 0.01})
    bench_diagnosis.main(["--replay", "--recordings", str(root), "--out", str(out),
                          "--set", "diagnosis.dead_gradients.enabled=false"])
    d = json.loads((out / "bench_diagnosis_tune.json").read_text())["scores"]["detlab"]
    assert d["per_class"]["frozen_backbone"]["first"] == [None]  # without dead_gradients: no finding today
    bench_diagnosis.main(["--replay", "--recordings", str(root), "--out", str(out), "--recorded-findings"])
    report = json.loads((out / "bench_diagnosis_tune.json").read_text())
    assert report["scores"]["detlab"]["per_class"]["frozen_backbone"]["first"] == ["dead_gradients@10"]
    assert report["findings_source"] == "recorded by the runs" and report["replay_agreement"] is None


def test_confirm_seeds_are_judged_unless_a_run_was_shortened(tmp_path):
    root, out = tmp_path / "rec", tmp_path / "out"
    fabricate(root, "confirm", {f"healthy-default-base-s{C1}": 0.04, f"fault-frozen_backbone-s{C1}": 0.01})
    bench_diagnosis.main(["--replay", "--seed-set", "confirm", "--recordings", str(root), "--out", str(out)])
    report = json.loads((out / "bench_diagnosis_confirm.json").read_text())
    assert report["targets"]["flagged_rate"]["met"] is True
    assert report["targets"]["false_alarm_rate"]["healthy_runs"] == 1
    assert report["targets"]["false_alarm_rate"]["met"] is False  # 1 false alarm, and 1 healthy run < 30
    fabricate(root, "confirm", {f"healthy-default-base-s{C2}": 0.04}, shortened=True)
    bench_diagnosis.main(["--replay", "--seed-set", "confirm", "--recordings", str(root), "--out", str(out)])
    assert json.loads((out / "bench_diagnosis_confirm_short.json").read_text())["targets"] is None


def test_replay_scored_with_another_specs_expected_sets(tmp_path):
    root, out = tmp_path / "rec", tmp_path / "out"
    fabricate(root, "confirm", {f"healthy-default-base-s{C1}": 0.04, f"fault-frozen_backbone-s{C1}": 0.01})
    later = edited_copy(SPEC_PATH, tmp_path, "expected: [dead_gradients]", "expected: [stuck]")
    bench_diagnosis.main(["--replay", "--seed-set", "confirm", "--recordings", str(root), "--out", str(out),
                          "--expected-of", str(later)])
    report = json.loads((out / "bench_diagnosis_confirm.json").read_text())
    assert report["scores"]["detlab"]["right_first"] == 0  # dead_gradients first, which that spec does not expect
    assert report["targets"] is None and report["expected_of"] == str(later)  # never judged
    bench_diagnosis.main(["--replay", "--seed-set", "confirm", "--recordings", str(root), "--out", str(out)])
    assert json.loads((out / "bench_diagnosis_confirm.json").read_text())["scores"]["detlab"]["right_first"] == 1


def test_the_plan_trains_nothing(capsys):
    assert bench_diagnosis.main(["--plan", "--part", "2/40"]) == 0
    text = capsys.readouterr().out
    assert "part 2/40" in text and "part 3/40" not in text and SPEC.sha256 in text


@pytest.mark.slow
def test_the_worker_trains_a_run_with_its_injection_and_writes_its_recording(tmp_path, synthetic_root):
    from benchmarks.diagnosis.spec import PlannedRun

    tiny = [f"dataset.root={synthetic_root}", "dataset.synthetic.num_images=20", "dataset.synthetic.image_width=160",
            "dataset.synthetic.image_height=128", "model.input_width=160", "model.input_height=128",
            "train.batch_size=8", "train.epochs=2", *SPEC.common_overrides]
    run = PlannedRun(name="fault-step_skipped-s0", kind="fault", group="step_skipped", variant="",
                     recipe="synthetic_default", seed_set="tune", seed=0, overrides=[*tiny, "train.seed=0"],
                     inject="step_skipped", expected=["stuck"])
    target = recording_path(tmp_path / "rec", SPEC.version, run.name)
    bench_diagnosis.worker({"run": run.to_dict(), "run_dir": str(tmp_path / "run"), "recording": str(target),
                            "spec_version": SPEC.version, "spec_sha256": SPEC.sha256, "shortened": False})
    rec = read_recording(target)
    assert rec.spec_sha256 == SPEC.sha256 and rec.run["inject"] == "step_skipped"
    assert rec.summary["status"] == "completed" and rec.total_steps == 4 and len(rec.steps) == 4
    assert [r["epoch"] for r in rec.epochs] == [1.0, 2.0]
    sampled = [s for s in rec.steps if "grad_dead_share" in s]  # every 5th step: step 0
    assert [s["step"] for s in sampled] == [0] and "grad_zero_share" in sampled[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # no checkpoint, no TensorBoard file
    assert not list((tmp_path / "run").glob("events.out.tfevents*"))
    found = replay_findings(rec.replay_config(), rec.steps, rec.epochs, rec.total_steps)
    assert [(f.detector, f.step) for f in found] == [(f["detector"], f["step"]) for f in rec.summary["findings"]]
