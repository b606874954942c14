"""detlab.analysis where two code paths became one: the Figure-5 grid of the sweep report and of the
results page, the learning-curve panel of plots/curves.png and of the results page's stage run, the
run status of the tables and the grid, and the reader's typed status and test columns."""

from __future__ import annotations

import importlib.util
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import detlab.analysis.sweep_report as sweep_report_module
from detlab.analysis import (
    CSV_COLUMNS,
    count_statuses,
    format_counts,
    learning_curves_png,
    load_run,
    load_sweep,
    plot_learning_curves,
    plot_stage_run,
    plot_sweep_grid,
    report_table,
    status_text,
    write_report,
)
from detlab.run_record import TEST_KEYS, RunStatus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_sweep(tmp_path, make_fake_sweep):
    """Box weights 0.01, 1 (completed, 3 epochs) and 10 (diverged after epoch 1, at step 75)."""
    return make_fake_sweep(tmp_path / "sweep", box_weights=(0.01, 1, 10), epochs_planned=3, diverge_at={10: 1},
                           fail=(), running={})


def grid_layout(fig):
    """What a reader of the grid sees, panel by panel: titles, axis labels, scales and limits."""
    return [(ax.get_title(), ax.get_ylabel(), ax.get_xlabel(), ax.get_yscale(),
             tuple(round(v, 9) for v in ax.get_ylim()), tuple(round(v, 9) for v in ax.get_xlim()))
            for ax in fig.axes if ax.get_visible()]


def test_the_grid_has_known_titles_rows_and_limits(small_sweep):
    fig = plot_sweep_grid(load_sweep(small_sweep))
    axes = np.array(fig.axes).reshape(3, 3)  # rows: class loss, box loss, mIoU; columns: runs by box weight
    assert [ax.get_title() for ax in axes[0]] == ["cls 1 : box 0.01\ncompleted", "cls 1 : box 1\ncompleted",
                                                  "cls 1 : box 10\nDIVERGED @ step 75"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["class loss", "box loss", "mIoU"]
    assert all(ax.get_ylabel() == "" for ax in axes[:, 1:].ravel())
    # class losses 1.0 (diverged, epoch 1) .. 2.2 (val, epoch 1): linear, 0 to 1.1 x the largest
    assert axes[0][0].get_yscale() == "linear" and axes[0][0].get_ylim() == pytest.approx((0.0, 2.2 * 1.1))
    # box losses 0.7 .. 2.53 (w=0.01: 0.3 + 1.2 + 0.4 * 2, val 1.1x)
    assert axes[1][0].get_ylim() == pytest.approx((0.0, 2.53 * 1.1))
    # mIoU: the best run reaches 0.5 at its last epoch
    assert axes[2][0].get_ylim() == pytest.approx((0.0, 0.5 * 1.15))
    assert all(ax.get_xlim() == pytest.approx((0.5, 3.5)) for ax in fig.axes)
    # the diverged run stopped at step 75 of 50 per epoch: a dotted line at epoch 1.5 in each of its panels
    for ax in axes[:, 2]:
        assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [1.5]
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["train", "val (per epoch)", "val mIoU", "stopped (diverged/failed)"]


def test_the_report_and_the_results_page_draw_the_same_grid(small_sweep, tmp_path, monkeypatch):
    """Both callers go through plot_sweep_grid and get the same panels for a sweep without event files."""
    drawn = {}

    def recording(name):
        def draw(runs, title="", per_step=False):
            drawn[name] = plot_sweep_grid(runs, title=title, per_step=per_step)
            return drawn[name]
        return draw

    monkeypatch.setattr(sweep_report_module, "plot_sweep_grid", recording("report"))
    write_report(small_sweep, tmp_path / "report")

    spec = importlib.util.spec_from_file_location("results_page_script", REPO / "scripts" / "results_page.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "plot_sweep_grid", recording("results page"))
    assert script.main(["--recipe", str(small_sweep), "--page", "-", "--figures", str(tmp_path / "figures")]) == 0

    report, page = grid_layout(drawn["report"]), grid_layout(drawn["results page"])
    assert len(report) == 9 and report == page
    assert drawn["report"]._suptitle.get_text() == f"sweep: {format_counts(load_sweep(small_sweep))}"


def test_the_per_step_grid_draws_every_step_from_the_event_files(small_sweep):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(small_sweep / "loss.box_weight=1"))
    for step in range(150):
        writer.add_scalar("train/loss_cls", 2.0 - step / 150, step)
        writer.add_scalar("train/loss_box", 1.0, step)
    writer.close()
    runs = load_sweep(small_sweep)
    fig = plot_sweep_grid(runs, per_step=True)
    axes = np.array(fig.axes).reshape(3, 3)
    raw, smoothed, val = axes[0][1].lines[:3]
    assert raw.get_xdata() == pytest.approx(np.arange(150) / 50)  # 50 steps per epoch
    assert raw.get_ydata() == pytest.approx(2.0 - np.arange(150) / 150)
    assert smoothed.get_ydata()[0] == pytest.approx(2.0) and smoothed.get_ydata()[-1] > raw.get_ydata()[-1]
    assert list(val.get_xdata()) == [1.0, 2.0, 3.0]
    # the other runs have no event files: their epoch means, as in the report
    assert list(axes[0][0].lines[0].get_xdata()) == [1.0, 2.0, 3.0]
    assert all(ax.get_xlim() == pytest.approx((0.0, 3.5)) for ax in fig.axes)  # steps start at 0
    assert fig.legends[0].get_texts()[0].get_text() == "train (per step, smoothed)"
    # the same panels, titles and labels as the report's grid, apart from the x range and the loss scale
    report = grid_layout(plot_sweep_grid(runs))
    assert [panel[:3] for panel in grid_layout(fig)] == [panel[:3] for panel in report]


def test_the_grid_wraps_wide_sweeps_into_balanced_bands_and_draws_an_empty_sweep(tmp_path, make_fake_sweep):
    runs = load_sweep(make_fake_sweep(tmp_path / "wide", box_weights=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
                                      epochs_planned=2, diverge_at={}))
    fig = plot_sweep_grid(runs)
    assert len(fig.axes) == 6 * 5 and len([ax for ax in fig.axes if ax.get_visible()]) == 3 * 10
    assert [ax.get_ylabel() for ax in np.array(fig.axes).reshape(6, 5)[:, 0]] == ["class loss", "box loss", "mIoU"] * 2
    assert not plot_sweep_grid([]).axes


def test_the_learning_curve_panel_is_the_same_in_curves_png_and_the_stage_run(tmp_path, make_fake_run):
    run = load_run(make_fake_run(tmp_path / "run", 1.0, epochs=3, findings=[
        {"detector": "avoidance", "stage": "early", "epoch": 2, "step": 100}]))
    curves, stage = plot_learning_curves(run.history, "title", run.findings).axes[0], plot_stage_run(run).axes[0]
    for ax in (curves, stage):
        assert ax.get_title() == "losses (unweighted)" and ax.get_yscale() == "log" and ax.get_xlabel() == "epoch"
        labelled = [line for line in ax.lines if not line.get_label().startswith("_")]
        assert [line.get_label() for line in labelled] == ["train/loss_cls", "val/loss_cls", "train/loss_box",
                                                           "val/loss_box"]
        assert labelled[0].get_ydata() == pytest.approx([2.0, 1.25, 1.0])  # 0.5 + 1.5 / epoch
        assert labelled[3].get_ydata() == pytest.approx([1.65, 1.1 * 0.9, 1.1 * 0.7])  # 1.1 x (0.3 + 1.2 / epoch)
        assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [2.0]  # the finding
        assert [text.get_text() for text in ax.texts] == [" avoidance"]
    right = plot_learning_curves(run.history, "title").axes[1]
    assert [line.get_label() for line in right.lines] == ["val/recall", "val/precision", "val/miou", "val/ap50"]
    assert right.get_ylim() == (0.0, 1.0)


@pytest.mark.slow
def test_curves_png_and_the_plot_run_script_write_the_end_of_run_figure(tmp_path, make_fake_run):
    run_dir = make_fake_run(tmp_path / "run", 1.0, epochs=1)
    png = learning_curves_png(load_run(run_dir).history, "one epoch")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (990, 360)  # 11 x 4 in at 90 dpi
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_run.py"), str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = (run_dir / "plots" / "curves.png").read_bytes()
    assert struct.unpack(">II", written[16:24]) == (990, 360)
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_run.py"), str(empty)],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no epoch yet" in missing.stderr


def test_status_text_names_the_step_the_divergence_check_named(tmp_path, make_fake_run):
    diverged = load_run(make_fake_run(tmp_path / "d", 10.0, status="diverged", epochs=1, epochs_planned=3, step=76,
                                      findings=[{"detector": "divergence", "epoch": 2, "step": 75}]))
    assert (diverged.step, diverged.stop_step) == (76, 75)
    assert status_text(diverged) == "DIVERGED at step 75 (1 of 3 epochs done)"
    assert status_text(diverged, compact=True) == "DIVERGED @ step 75"
    running = load_run(make_fake_run(tmp_path / "r", 1.0, status="running", epochs=1, epochs_planned=3))
    assert status_text(running) == "running (1 of 3 epochs done)" and status_text(running, compact=True) == "running @ epoch 1"
    completed = load_run(make_fake_run(tmp_path / "c", 1.0, epochs=2))
    assert status_text(completed) == status_text(completed, compact=True) == "completed"


def test_statuses_are_run_statuses_and_unknown_is_counted(tmp_path, make_fake_run):
    make_fake_run(tmp_path / "s" / "a", 1.0, epochs=1)
    broken = make_fake_run(tmp_path / "s" / "b", 2.0, epochs=1)
    (broken / "summary.json").write_text("[1, 2]")  # not an object: unreadable
    runs = load_sweep(tmp_path / "s")
    assert [run.status for run in runs] == [RunStatus.COMPLETED, RunStatus.UNKNOWN]
    assert all(isinstance(run.status, RunStatus) for run in runs)
    assert count_statuses(runs) == {"completed": 1, "diverged": 0, "failed": 0, "stopped": 0, "running": 0,
                                    "unknown": 1}
    assert all(type(key) is str for key in count_statuses(runs))
    assert [row["status"] for row in report_table(runs)] == ["completed", "unknown"]


def test_the_report_has_every_test_key_the_evaluation_writes(tmp_path, make_fake_run):
    test = {"wider_easy": 0.8, "wider_medium": 0.7, "wider_hard": 0.5, "recall": 0.4, "precision": 0.9,
            "tp": 40, "fp": 4, "fn": 60, "miou": 0.3, "ap50": 0.35, "input_size": 640, "epoch": 2}
    row = report_table([load_run(make_fake_run(tmp_path / "run", 1.0, epochs=2, test=test))])[0]
    assert [c for c in CSV_COLUMNS if c.startswith("test/")] == [f"test/{key}" for key in TEST_KEYS]
    assert row["test/ap50"] == pytest.approx(0.35) and row["test/tp"] == 40 and isinstance(row["test/tp"], int)
    assert all(not math.isnan(row[f"test/{key}"]) for key in TEST_KEYS)
