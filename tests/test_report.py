import csv
import json
import math
import struct
from pathlib import Path

import pytest

from detlab.analysis import (
    CSV_COLUMNS,
    compact_findings,
    count_statuses,
    format_counts,
    load_run,
    load_sweep,
    print_summary_counts,
    report_table,
    write_report,
)
from detlab.run_record import read_metrics

REPO = Path(__file__).resolve().parents[1]


def approx(value):
    return pytest.approx(value, rel=1e-12, abs=1e-12)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, make_fake_run):
    """Four runs of a 4-epoch sweep: completed (w=1), diverged (w=10), failed (w=5), running (w=0.1)."""
    root = tmp_path_factory.mktemp("sweep")
    make_fake_run(root / "loss.box_weight=1", 1.0, status="completed", epochs=4,
                  findings=[{"detector": "avoidance", "stage": "early", "step": 50, "epoch": 1, "evidence": {},
                             "remedy": "lower the score floor"}])
    make_fake_run(root / "loss.box_weight=10", 10.0, status="diverged", epochs=2, epochs_planned=4,
                  findings=[{"detector": "loss_imbalance", "stage": "early", "step": 20, "epoch": 1,
                             "evidence": {"grad_ratio": 85.0}}])
    make_fake_run(root / "loss.box_weight=5", 5.0, status="failed", epochs=0, epochs_planned=4,
                  write_metrics=False, step=0)
    make_fake_run(root / "loss.box_weight=0.1", 0.1, status="running", epochs=2, epochs_planned=4,
                  write_summary=False, partial_last_line=True)
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(sweep, out)


def rows_by_box_weight(sweep):
    return {row["box_weight"]: row for row in report_table(load_sweep(sweep))}


def test_sweep_is_sorted_numerically_and_named_by_defining_overrides(sweep):
    runs = load_sweep(sweep)
    assert [r.box_weight for r in runs] == [0.1, 1.0, 5.0, 10.0]  # not "10" < "5"
    assert [r.name for r in runs] == ["loss.box_weight=0.1", "loss.box_weight=1",
                                      "loss.box_weight=5", "loss.box_weight=10"]
    assert [r.status for r in runs] == ["running", "completed", "failed", "diverged"]


def test_completed_row_has_the_known_values(sweep):
    row = rows_by_box_weight(sweep)[1.0]
    # epoch 4 of 4, w=1: q=1, miou=0.5, tp=80, fp=20, fn=20, precision=recall=0.8, ap50=0.9*0.64
    assert row["run"] == "loss.box_weight=1"
    assert (row["class_weight"], row["status"], row["epochs"], row["epochs_planned"]) == (1.0, "completed", 4, 4)
    assert row["best_miou"] == approx(0.5) and row["best_epoch"] == 4
    assert row["final_miou"] == approx(0.5)
    assert (row["tp"], row["fp"], row["fn"]) == (80, 20, 20)
    assert row["precision"] == approx(0.8) and row["recall"] == approx(0.8)
    assert row["ap50"] == approx(0.576)
    # early: epoch 1 (cls 0.5+1.5, box 0.3+1.2); mid: epoch 2; late: epochs 3-4 (> 0.7*4)
    assert (row["early/loss_cls"], row["early/loss_box"], row["early/loss_total"]) == (approx(2.0), approx(1.5),
                                                                                     approx(3.5))
    assert (row["mid/loss_cls"], row["mid/loss_box"], row["mid/loss_total"]) == (approx(1.25), approx(0.9),
                                                                               approx(2.15))
    assert (row["late/loss_cls"], row["late/loss_box"], row["late/loss_total"]) == (approx(0.9375), approx(0.65),
                                                                                  approx(1.5875))
    assert row["findings"] == "avoidance@e1"
    assert row["wall_time_s"] == approx(42.5)


def test_diverged_row_stops_early_with_its_message(sweep):
    row = rows_by_box_weight(sweep)[10.0]
    run = next(r for r in load_sweep(sweep) if r.box_weight == 10.0)
    assert run.status == "diverged" and run.failed and run.step == 125 and len(run.history) == 2
    assert row["message"] == "non-finite loss (nan) at step 125"
    assert (row["epochs"], row["epochs_planned"]) == (2, 4)
    # exploding curves: cls 3**(e-1), box 10**(e-1); miou 0.02/e, best at epoch 1; q=0.5 so fp=50
    assert row["best_miou"] == approx(0.02) and row["best_epoch"] == 1
    assert row["final_miou"] == approx(0.01)
    assert (row["tp"], row["fp"], row["fn"]) == (2, 50, 98)
    assert (row["early/loss_cls"], row["early/loss_box"], row["early/loss_total"]) == (approx(1), approx(1),
                                                                                     approx(11))
    assert row["mid/loss_total"] == approx(3 + 10 * 10)
    assert row["late/loss_total"] is None
    assert row["findings"] == "loss_imbalance@s20"


def test_failed_run_without_metrics_has_empty_values(sweep):
    row = rows_by_box_weight(sweep)[5.0]
    assert row["status"] == "failed" and row["epochs"] == 0
    assert row["message"] == "RuntimeError: CUDA out of memory"
    for column in ("best_miou", "final_miou", "ap50", "tp", "fp", "fn", "precision", "recall", "early/loss_cls"):
        assert row[column] is None, column


def test_running_run_without_summary_reads_metrics_and_hydra_record(sweep):
    run = next(r for r in load_sweep(sweep) if r.status == "running")
    row = report_table([run])[0]
    # weights from .hydra (overrides, then config.yaml); the half-written third line is dropped
    assert (row["box_weight"], row["class_weight"], row["epochs"], row["epochs_planned"]) == (0.1, 1.0, 2, 4)
    assert len(run.history) == 2 and any("partially written" in w for w in run.warnings)
    # w=0.1: q=0.5, epoch 2 of 4: miou=0.125, tp=20, fp=50
    assert row["final_miou"] == approx(0.125) and (row["tp"], row["fp"], row["fn"]) == (20, 50, 80)
    assert row["wall_time_s"] is None and row["early/loss_cls"] is None


def test_counts(sweep, capsys):
    runs = load_sweep(sweep)
    assert count_statuses(runs) == {"completed": 1, "diverged": 1, "failed": 1, "stopped": 0, "running": 1}
    assert format_counts(runs) == "4 runs: 1 completed, 1 diverged, 1 failed, 0 stopped, 1 running"
    print_summary_counts(runs)
    assert capsys.readouterr().out == "4 runs: 1 completed, 1 diverged, 1 failed, 0 stopped, 1 running\n"


def test_report_csv_parses_back_with_its_header(report):
    with open(report["csv"], newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == list(CSV_COLUMNS)
    assert [r["run"] for r in rows] == ["loss.box_weight=0.1", "loss.box_weight=1", "loss.box_weight=5",
                                        "loss.box_weight=10"]
    completed = rows[1]
    assert float(completed["final_miou"]) == approx(0.5) and int(completed["tp"]) == 80
    assert float(completed["late/loss_total"]) == approx(1.5875)
    assert rows[2]["status"] == "failed" and rows[2]["final_miou"] == "" and rows[2]["tp"] == ""


def test_report_png_is_a_valid_image_of_reasonable_size(report):
    data = Path(report["png"]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 4000 and 300 <= height <= 3000, (width, height)
    assert len(data) > 10_000
    assert not list(Path(report["png"]).parent.glob("*.tmp"))


def test_report_md_marks_failed_runs(report):
    text = Path(report["md"]).read_text()
    assert "4 runs: 1 completed, 1 diverged, 1 failed, 0 stopped, 1 running" in text
    table = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| loss.")}
    assert "**DIVERGED**" in table["loss.box_weight=10"]
    assert "**FAILED**" in table["loss.box_weight=5"]
    assert "**" not in table["loss.box_weight=1"] and "| completed |" in table["loss.box_weight=1"]
    assert "*running*" in table["loss.box_weight=0.1"]
    assert "non-finite loss (nan) at step 125" in text and "RuntimeError: CUDA out of memory" in text
    assert "avoidance@e1" in table["loss.box_weight=1"]


def test_report_md_gives_each_finding_in_words_with_what_to_do_in_its_own_column(report, tmp_path, make_fake_run):
    from detlab.analysis import findings_table
    from detlab.diagnosis import get_detector

    text = Path(report["md"]).read_text()
    lines = text.splitlines()
    start = lines.index("## Diagnosis findings")
    assert lines[start + 2] == "| run | finding | when | cause | evidence | what to do |"
    # records written before findings carried their words take the title and the cause from the detector
    assert lines[start + 4] == (f"| `loss.box_weight=1` | avoidance | epoch 1, step 50 "
                                f"(early stage) | {get_detector('avoidance').cause} | - | lower the score floor |")
    assert lines[start + 5].startswith("| `loss.box_weight=10` | loss imbalance | epoch 1, step 20 (early stage) | ")
    # a finding as the diagnosis records it now: its own words, a note marked as such
    record = {"detector": "under_confidence", "title": "under-confidence", "severity": "note", "failure": False,
              "stage": "late", "step": 90, "epoch": 9, "cause": "the scores are not yet confident",
              "message": "AP50 was 0.3 | 0.02 boxes per image", "evidence": {"ap50": 0.3},
              "remedy": "train longer: train.epochs=30 (now 15)"}
    run = load_run(make_fake_run(tmp_path / "run", 1.0, epochs=2, findings=[record]))
    assert findings_table([run], with_run=False).splitlines()[2] == (
        "| under-confidence (a note) | epoch 9, step 90 (late stage) | the scores are not yet confident | "
        "AP50 was 0.3 \\| 0.02 boxes per image | train longer: train.epochs=30 (now 15) |")


def test_metrics_csv_tolerates_nan_empty_cells_bad_and_partial_lines(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,val/miou\n1,50,nan\n2,100,\nbroken\n3,150,inf\n4,20")
    warnings = []
    rows = read_metrics(path, warnings)
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    assert math.isnan(rows[0]["val/miou"]) and math.isnan(rows[1]["val/miou"]) and rows[2]["val/miou"] == math.inf
    assert len(warnings) == 2 and "metrics.csv:4" in warnings[0] and "partially written" in warnings[1]
    (tmp_path / "empty.csv").write_text("")
    assert read_metrics(tmp_path / "empty.csv") == [] and read_metrics(tmp_path / "missing.csv") == []


def test_running_summary_empty_metrics_and_folder_name_fallbacks(tmp_path, make_fake_run):
    run_dir = make_fake_run(tmp_path / "a", 0.5, status="running", epochs=1, epochs_planned=3)
    assert load_run(run_dir).status == "running"
    # a failed run whose metrics.csv is empty
    failed = make_fake_run(tmp_path / "b", 2.0, status="failed", epochs=0, epochs_planned=3, write_metrics=False)
    (failed / "metrics.csv").write_text("")
    assert load_run(failed).status == "failed" and load_run(failed).history == []
    # no summary, overrides without the weight: name from the folder, weight from .hydra/config.yaml
    bare = make_fake_run(tmp_path / "job_7", 0.2, write_summary=False, epochs=1)
    (bare / ".hydra" / "overrides.yaml").write_text("- +preset=quick\n")
    run = load_run(bare)
    assert (run.name, run.box_weight, run.status) == ("job_7", 0.2, "running")
    # unreadable summary: status unknown, not a crash
    (run_dir / "summary.json").write_text('{"status": "compl')
    assert load_run(run_dir).status == "unknown"


def test_compact_findings():
    findings = [{"detector": "avoidance", "epoch": 1, "step": 50},
                {"detector": "loss_imbalance", "epoch": 1, "step": 200},  # step-level: shown at its step
                {"detector": "loss_imbalance", "epoch": 2, "step": 400},
                {"detector": "overfitting", "epoch": None, "step": 900},  # epoch unknown: falls back to step
                {"detector": "stuck"}]
    assert compact_findings(findings) == "avoidance@e1; loss_imbalance@s200(x2); overfitting@s900; stuck"
    assert compact_findings([]) == ""
    # a note is marked; a detector's first alarm is shown before its notes, which still count
    noted = [{"detector": "loss_imbalance", "step": 10, "severity": "note"},
             {"detector": "avoidance", "epoch": 2, "severity": "note"},
             {"detector": "avoidance", "epoch": 5, "severity": "failure"}]
    assert compact_findings(noted) == "loss_imbalance@s10 (note); avoidance@e5(x2)"


def test_partial_and_empty_sweeps(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_sweep(empty) == []
    paths = write_report(empty)  # a sweep that has not started a run: a report, not an error
    assert "0 runs: 0 completed" in paths["md"].read_text() and "No run directories" in paths["md"].read_text()
    assert paths["csv"].read_text() == ",".join(CSV_COLUMNS) + "\n"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_sweep(empty) == []  # the report files do not look like a run
    # nested layout (sweep/<date>/<time>/<run>) and a sweep just started (only .hydra written)
    just_started = tmp_path / "nested" / "2024-05-01" / "12-00-00" / "loss.box_weight=2"
    (just_started / ".hydra").mkdir(parents=True)
    (just_started / ".hydra" / "overrides.yaml").write_text("- loss.box_weight=2\n")
    runs = load_sweep(tmp_path / "nested")
    assert [(r.name, r.status, r.epochs, r.box_weight) for r in runs] == [("loss.box_weight=2", "running", 0, 2.0)]


def test_script_prints_table_and_paths(tmp_path, capsys, make_fake_sweep):
    sweep = make_fake_sweep(tmp_path / "sweep", box_weights=(0.05, 1, 10), epochs_planned=3,
                            diverge_at={10: 1}, fail=(0.05,))
    from detlab.cli.report import main

    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 runs: 1 completed, 1 diverged, 1 failed, 0 stopped, 0 running")
    assert "| loss.box_weight=10 | 1 | 10 | **DIVERGED** |" in out
    for name in ("report.md", "report.csv", "report.png"):
        assert str(tmp_path / "out" / name) in out and (tmp_path / "out" / name).is_file()
    summary = json.loads((sweep / "loss.box_weight=10" / "summary.json").read_text())
    assert summary["status"] == "diverged"  # the report never rewrites run files
    assert main([str(tmp_path / "missing")]) == 2


def test_run_names_leave_out_the_composed_hydra_exclude_keys(tmp_path, make_fake_run):
    from omegaconf import OmegaConf

    from detlab.analysis import entry_config_path

    own = make_fake_run(tmp_path / "own", 0.5, write_summary=False, epochs=1)
    (own / ".hydra").mkdir(exist_ok=True)
    (own / ".hydra" / "overrides.yaml").write_text("- loss.box_weight=0.5\n- my.seed=3\n- train.device=cpu\n")
    (own / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  job:\n    config:\n      override_dirname:\n        exclude_keys: [my.seed]\n")
    assert load_run(own).name == "loss.box_weight=0.5,train.device=cpu"  # this run's own list

    entry = OmegaConf.load(entry_config_path()).hydra.job.config.override_dirname.exclude_keys
    assert "train.device" in entry and "resume" in entry
    bare = make_fake_run(tmp_path / "bare", 0.5, write_summary=False, epochs=1)
    (bare / ".hydra").mkdir(exist_ok=True)
    (bare / ".hydra" / "overrides.yaml").write_text("- loss.box_weight=0.5\n- train.device=cpu\n- resume=true\n")
    assert load_run(bare).name == "loss.box_weight=0.5"  # no Hydra record: the entry config's list
