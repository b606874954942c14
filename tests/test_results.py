"""detlab.analysis (the results page's parts) and scripts/results_page.py: the results page's tables, figures and blocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detlab.analysis import (
    load_run,
    load_sweep,
    plot_ap_against_box_weight,
    plot_stage_run,
    plot_sweep_grid,
    remedy_table,
    repair_table,
    replace_blocks,
    smooth,
    step_series,
    sweep_command,
    sweep_table,
)

REPO = Path(__file__).resolve().parents[1]
WIDER_TEST = {"wider_easy": 0.831, "wider_medium": 0.783, "wider_hard": 0.589, "recall": 0.41,
              "precision": 0.85, "tp": 763, "fp": 133, "fn": 1104, "miou": 0.32, "input_size": 640, "epoch": 3}


def test_replace_blocks_rewrites_only_named_blocks_and_keeps_the_prose():
    page = ("# Results\nprose before\n<!-- results:a -->\nold a\n<!-- /results:a -->\nmiddle\n"
            "<!-- results:b -->\nold b\n<!-- /results:b -->\nend\n")
    text, untouched = replace_blocks(page, {"a": "new a\nline 2"})
    assert text == ("# Results\nprose before\n<!-- results:a -->\nnew a\nline 2\n<!-- /results:a -->\nmiddle\n"
                    "<!-- results:b -->\nold b\n<!-- /results:b -->\nend\n")
    assert untouched == ["b"]
    again, _ = replace_blocks(text, {"a": "new a\nline 2"})
    assert again == text  # regenerating with the same figures changes nothing


def test_smooth_is_tensorboards_debiased_moving_average():
    assert smooth(np.array([2.0, 2.0, 2.0])) == pytest.approx([2.0, 2.0, 2.0])
    out = smooth(np.array([0.0, 1.0, np.nan]), weight=0.5)
    assert out[:2] == pytest.approx([0.0, 0.5 / 0.75]) and np.isnan(out[2])


def test_step_series_keeps_the_last_value_of_a_step_logged_by_a_resumed_session(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path), filename_suffix=".a")
    for step in range(5):
        first.add_scalar("train/loss_cls", 10.0 + step, step)
    first.close()
    second = SummaryWriter(str(tmp_path), filename_suffix=".b")
    for step in range(3, 6):
        second.add_scalar("train/loss_cls", 100.0 + step, step)
    second.close()
    steps, values = step_series(tmp_path)["train/loss_cls"]
    assert steps.tolist() == [0, 1, 2, 3, 4, 5]
    assert values.tolist() == [10.0, 11.0, 12.0, 103.0, 104.0, 105.0]
    assert "train/loss_box" not in step_series(tmp_path)


def test_sweep_table_orders_by_box_weight_and_shows_the_test(tmp_path, make_fake_run):
    make_fake_run(tmp_path / "s" / "1", 5.0, epochs=3, test=WIDER_TEST)
    make_fake_run(tmp_path / "s" / "0", 0.01, status="diverged", epochs=1, epochs_planned=3)
    lines = sweep_table(load_sweep(tmp_path / "s")).splitlines()
    assert lines[0].startswith("| box weight | status | easy AP | medium AP | hard AP | recall@0.5 |")
    assert lines[2].startswith("| 0.01 | DIVERGED at step 75 (1 of 3 epochs done) | - | - | - | - | - | - | - |")
    assert lines[3].startswith("| 5 | completed | 83.1 | 78.3 | 58.9 | 0.410 | 0.850 | 763 / 133 / 1,104 | 0.320 |")


def test_remedy_table_puts_the_baseline_first_with_the_change_in_medium_ap(tmp_path, make_fake_run):
    runs = [load_run(make_fake_run(tmp_path / name, 10.0, epochs=2, extra_overrides=(f"+remedy={name}",),
                                   test={**WIDER_TEST, "wider_medium": medium}))
            for name, medium in (("no_warmup", 0.40), ("adaptive_weights", 0.5))]
    # the baseline is the sweep's own run of the pair: no +remedy override
    runs.insert(1, load_run(make_fake_run(tmp_path / "sweep_run", 10.0, epochs=2, extra_overrides=(),
                                          test={**WIDER_TEST, "wider_medium": 0.45})))
    lines = remedy_table(runs).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| none", "| adaptive_weights", "| no_warmup"]
    assert lines[2].split(" | ")[-2] == "-"
    assert lines[3].split(" | ")[-2] == "+5.0" and lines[4].split(" | ")[-2] == "-5.0"


def test_repair_table_gives_each_pair_what_its_repairs_did_and_when(tmp_path, make_fake_run):
    import json

    runs = []
    for box, repairs in ((10.0, [{"repair": "rebalance", "step": 15, "epoch": 1, "message": "steered"},
                                 {"repair": "rollback", "step": 39, "epoch": 1, "message": "back"}]), (5.0, [])):
        folder = make_fake_run(tmp_path / f"b{box:g}", box, epochs=2, test=WIDER_TEST)
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, "repairs": repairs}))
        runs.append(load_run(folder))
    lines = repair_table(runs).splitlines()
    assert lines[0].startswith("| box weight | status |") and lines[0].endswith("| repairs | findings |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 5", "| 10"]
    assert lines[2].split(" | ")[-2] == "none"
    assert lines[3].split(" | ")[-2] == "rebalance@s15; rollback@s39"


def test_figures_draw_on_partial_sweeps_without_test_or_event_files(tmp_path, make_fake_sweep):
    runs = load_sweep(make_fake_sweep(tmp_path / "s", box_weights=(0.01, 1, 10), epochs_planned=3,
                                      diverge_at={10: 1}, fail=(), running={1: 1}))
    grid = plot_sweep_grid(runs, per_step=True)
    assert len(grid.axes) == 3 * 3
    ap = plot_ap_against_box_weight([("a", runs), ("b", runs)])
    assert len([ax for ax in ap.axes if ax.get_visible()]) == 2
    assert plot_stage_run(runs[0]).axes
    assert sweep_command(tmp_path / "s") is None  # a multirun.yaml without Hydra's overrides


def test_wall_times_of_groups_measured_again_replace_their_rows_and_keep_the_others():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from results_page import merge_rows
    finally:
        sys.path.pop(0)
    old = "| what | runs |\n|---|---|\n| recipe sweep | 9 |\n| remedies | 5 |\n| stages run 0 | 1 |\n"
    new = "| what | runs |\n|---|---|\n| remedies | 6 |\n| repairs | 2 |\n"
    assert merge_rows(old, new).splitlines() == ["| what | runs |", "|---|---|", "| recipe sweep | 9 |",
                                                 "| remedies | 6 |", "| stages run 0 | 1 |", "| repairs | 2 |"]
    assert merge_rows("", new) == new.strip()


@pytest.mark.slow
def test_results_page_script_fills_the_page_and_writes_the_figures(tmp_path, make_fake_sweep, make_fake_run):
    sweep = make_fake_sweep(tmp_path / "recipe", box_weights=(0.01, 1, 10), epochs_planned=3, diverge_at={},
                            fail=(), running={})
    remedies = tmp_path / "remedies"
    make_fake_run(remedies / "0", 10.0, epochs=3, extra_overrides=("+remedy=no_warmup",), test=WIDER_TEST)
    page = tmp_path / "results.md"
    page.write_text("intro\n<!-- results:recipe_table -->\nTBD\n<!-- /results:recipe_table -->\n"
                    "<!-- results:paper_table -->\nkept\n<!-- /results:paper_table -->\n"
                    "<!-- results:remedy_table -->\n<!-- /results:remedy_table -->\n")
    figures = tmp_path / "figures"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "results_page.py"), "--recipe", str(sweep),
                           "--remedies", str(remedies), "--page", str(page), "--figures", str(figures)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "TBD" not in text and "| 0.01 | completed |" in text and "\nkept\n" in text
    assert "| no_warmup | 10 | completed | 83.1 |" in text
    assert "kept as they were (no option given): paper_table" in done.stdout
    assert "no block for wall_times" in done.stderr
    assert {p.name for p in figures.iterdir()} == {"recipe_grid.png", "ap_against_box_weight.png"}

    missing = subprocess.run([sys.executable, str(REPO / "scripts" / "results_page.py"), "--recipe", str(sweep),
                              "--page", str(tmp_path / "nope.md"), "--figures", str(figures)],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "nope.md: not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
