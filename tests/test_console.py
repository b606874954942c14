"""The console output of a run (``detlab.engine.loggers.ConsoleLogger``): a line per epoch, the table
at the end."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from detlab.engine.loggers import ConsoleLogger, epoch_line, findings_table, summary_table
from detlab.engine.trainer import Trainer
from detlab.run_record import RunStatus, RunSummary

AVOIDANCE = {"detector": "avoidance", "title": "avoidance (predicts only background)", "severity": "failure",
             "failure": True, "stage": "early", "step": 40, "epoch": 2, "cause": "background outweighs the faces",
             "message": "almost no box is predicted", "evidence": {"pred_per_image": 0.1},
             "remedy": "mine hard negatives: loss.neg_pos_ratio=3 (now 0); check eval.score_threshold (now 0.5)"}
# a record written before findings carried their words: the title and the cause come from the detector
UNDER_CONFIDENCE = {"detector": "under_confidence", "stage": "late", "step": 230, "epoch": 12,
                    "message": "scores sit below the threshold", "evidence": {}, "remedy": "", "failure": False}


def _row(epoch: int, recall: float, precision: float, miou: float, ap50: float, tp: int, fp: int, fn: int) -> dict:
    return {"epoch": epoch, "train/loss_cls": 1.23456, "train/loss_box": 0.5, "train/loss_total": 1.73456,
            "val/recall": recall, "val/precision": precision, "val/miou": miou, "val/ap50": ap50,
            "val/tp": float(tp), "val/fp": float(fp), "val/fn": float(fn)}


def test_the_epoch_line_shows_losses_metrics_and_the_findings_so_far():
    row = _row(3, 0.41234, 0.5, 0.30051, 0.28749, 41, 41, 59)
    assert epoch_line(row, 20, []) == ("epoch 3/20  train loss cls 1.235 box 0.5 total 1.735 | val recall 0.412 "
                                       "precision 0.5 mIoU 0.301 AP50 0.287 | findings 0")
    again = {**AVOIDANCE, "step": 60}
    assert epoch_line(row, 20, [AVOIDANCE, again, UNDER_CONFIDENCE]).endswith(
        "| findings 3: avoidance (predicts only background), under-confidence (a note)")
    assert "recall nan" in epoch_line({**row, "val/recall": float("nan")}, 20, [])


def test_the_final_table_from_a_fabricated_record():
    summary = RunSummary(
        status=RunStatus.STOPPED, message="early stopping: val/miou did not improve for 3 epochs", step=240,
        epochs=12, epochs_planned=20, best=_row(9, 0.52, 0.8125, 0.4512, 0.43219, 52, 12, 48),
        best_by={"monitor": "val/miou", "mode": "max", "value": 0.4512, "epoch": 9},
        final=_row(12, 0.5, 0.75, 0.44, 0.41, 50, 17, 50), findings=[AVOIDANCE, UNDER_CONFIDENCE],
        repairs=[{"repair": "rollback", "step": 100, "epoch": 5, "message": "back to epoch 4, lr x0.5"}],
        test={"recall": 0.49, "precision": 0.7, "tp": 49.0, "fp": 21.0, "fn": 51.0, "miou": 0.43, "ap50": 0.4,
              "wider_easy": 0.61, "wider_medium": 0.52, "wider_hard": 0.25, "input_size": [320, 256], "epoch": 12},
        wall_time_s=3725.0)
    assert summary_table(summary, "outputs/my run").splitlines() == [
        "run stopped: 12/20 epochs, 240 steps, 1:02:05; best epoch 9 (val/miou 0.451, max)",
        "message: early stopping: val/miou did not improve for 3 epochs",
        "                       recall  precision       mIoU       AP50         TP         FP         FN",
        "final (epoch 12)          0.5       0.75       0.44       0.41         50         17         50",
        "best (epoch 9)           0.52      0.812      0.451      0.432         52         12         48",
        "test (epoch 12)          0.49        0.7       0.43        0.4         49         21         51",
        "test: checkpoints/last.pt scored after training (eval.test_protocol), input size 320x256, "
        "WIDER AP easy 0.61, WIDER AP medium 0.52, WIDER AP hard 0.25; test.json",
        "findings (2):",
        "  finding               when               cause                           evidence                            "
        "what to do",
        "  --------------------  -----------------  ------------------------------  ----------------------------------  "
        "------------------------------------",
        "  avoidance (predicts   epoch 2, step 40   background outweighs the faces  almost no box is predicted          "
        "- mine hard negatives:",
        "  only background)      (early stage)                                                                            "
        "loss.neg_pos_ratio=3 (now 0)",
        "                                                                                                               "
        "- check eval.score_threshold (now",
        "                                                                                                                 "
        "0.5)",
        "  under-confidence (a   epoch 12, step     the ranking is learnt but the   scores sit below the threshold      -",
        "  note)                 230 (late stage)   scores are not yet confident;",
        "                                           rebalancing the loss or a",
        "                                           warm-up will not help",
        "repair: rollback at step 100 (epoch 5): back to epoch 4, lr x0.5",
        "run folder:  outputs/my run",
        "TensorBoard: tensorboard --logdir 'outputs/my run'",
    ]


def test_a_run_that_failed_before_its_first_epoch_says_so():
    summary = RunSummary(status=RunStatus.FAILED, message="BadImageError: unreadable image a.jpg", epochs=0,
                         epochs_planned=5, wall_time_s=1.25)
    assert summary_table(summary, "/runs/x").splitlines() == [
        "run failed: 0/5 epochs, 0 steps, 1.2 s",
        "message: BadImageError: unreadable image a.jpg",
        "no validated epoch: no metrics",
        "findings: none",
        "run folder:  /runs/x",
        "TensorBoard: tensorboard --logdir /runs/x",
    ]


def test_console_handlers_write_through_tqdm_while_training_and_are_restored():
    """From on_train_start to on_train_end (or on_end, when a later on_train_start failed) a console
    handler is swapped for one writing through tqdm, which clears the progress bars around each line."""
    import sys
    from types import SimpleNamespace

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        trainer = SimpleNamespace(paths=SimpleNamespace(root="/runs/x"))
        for end in ("on_train_end", "on_end"):
            logger = ConsoleLogger()
            logger.on_train_start(trainer, None)
            assert console not in root.handlers
            assert any(type(h).__module__ == "tqdm.contrib.logging" for h in root.handlers)
            if end == "on_end":
                logger.on_end(trainer, RunSummary(status=RunStatus.FAILED, message="disk full"))
            else:
                logger.on_train_end(trainer)
            assert console in root.handlers and not any(type(h).__module__ == "tqdm.contrib.logging"
                                                        for h in root.handlers)
    finally:
        root.removeHandler(console)


def _cells(line: str) -> list[str]:
    """The seven metric cells at the end of a table row."""
    return line.split()[-7:]


@pytest.mark.slow
def test_a_tiny_run_prints_its_epochs_and_its_table(synthetic_root, tiny_config, tmp_path, caplog):
    """A 2-epoch run with a box weight of 100 (a loss_imbalance finding) and the after-training test:
    what it prints is what its metrics.csv and summary.json hold."""
    # a box-dominant ratio is judged in the first box_epochs epochs: 2 steps an epoch here, under the 3 samples
    # it needs, so both epochs
    cfg = tiny_config(synthetic_root, "loss.box_weight=100", "train.epochs=2", "eval.test_protocol=detection",
                      "eval.score_threshold=0.05", "train.sample_grid=0", "train.plots=false",
                      "diagnosis.loss_imbalance.box_epochs=2")
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="detlab.engine.loggers")
    root_handlers = list(logging.getLogger().handlers)
    Trainer(cfg, run_dir).run()
    assert logging.getLogger().handlers == root_handlers  # the tqdm redirection is undone

    printed = [r.getMessage() for r in caplog.records if r.name == "detlab.engine.loggers"]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test"] is not None
    findings = summary["findings"]
    assert "loss_imbalance" in {f["detector"] for f in findings}
    lines, table = printed[:-1], printed[-1].splitlines()

    assert len(lines) == len(rows) == 2
    for line, row in zip(lines, rows):
        epoch = int(row["epoch"])
        so_far = [f for f in findings if f["epoch"] <= epoch]
        assert line.startswith(f"epoch {epoch}/2  train loss cls {float(row['train/loss_cls']):.4g} "
                               f"box {float(row['train/loss_box']):.4g} total {float(row['train/loss_total']):.4g} |")
        assert (f"| val recall {float(row['val/recall']):.3g} precision {float(row['val/precision']):.3g} "
                f"mIoU {float(row['val/miou']):.3g} AP50 {float(row['val/ap50']):.3g} |") in line
        # a note says so (under AdamW this imbalance is one)
        names = list(dict.fromkeys(f["title"] + (" (a note)" if f["severity"] == "note" else "") for f in so_far))
        assert line.endswith(f"| findings {len(so_far)}" + (f": {', '.join(names)}" if names else ""))

    last, best, test = rows[-1], summary["best"], summary["test"]
    assert table[0].startswith(f"run completed: 2/2 epochs, {summary['step']} steps, ")
    assert table[0].endswith(f"; best epoch {best['epoch']} (val/ap50 {best['val/ap50']:.3g}, max)")
    assert table[1].split() == ["recall", "precision", "mIoU", "AP50", "TP", "FP", "FN"]
    keys, counts = ("recall", "precision", "miou", "ap50"), ("tp", "fp", "fn")
    assert table[2].startswith("final (epoch 2)") and _cells(table[2]) == [
        *(f"{float(last[f'val/{k}']):.3g}" for k in keys), *(str(int(float(last[f"val/{k}"]))) for k in counts)]
    assert table[3].startswith(f"best (epoch {best['epoch']})") and _cells(table[3]) == [
        *(f"{best[f'val/{k}']:.3g}" for k in keys), *(str(int(best[f"val/{k}"])) for k in counts)]
    assert table[4].startswith("test (epoch 2)") and _cells(table[4]) == [
        *(f"{test[k]:.3g}" for k in keys), *(str(int(test[k])) for k in counts)]
    assert table[5].startswith("test: checkpoints/last.pt") and "input size 160x128" in table[5]
    assert table[6] == f"findings ({len(findings)}):"
    assert table[7].split() == ["finding", "when", "cause", "evidence", "what", "to", "do"]
    assert table[7:-3] == findings_table(findings)  # the findings' words as summary.json holds them
    assert table[-3].startswith(f"pre-flight: 0 fatal, {summary['preflight']['warnings']} warning(s), ")
    assert all(f["title"] and f["cause"] and f["message"] and f["remedy"] for f in findings)
    assert table[-2:] == [f"run folder:  {run_dir}", f"TensorBoard: tensorboard --logdir {run_dir}"]

