"""Learning curve of one run as a PNG: losses, and val recall / precision / mIoU / AP50 by epoch.

    python scripts/plot_run.py outputs/<date>/<time> [--out curve.png] [--title "..."]

Reads the run's ``metrics.csv`` (written by train.py each epoch); the stage boundaries come from its
``summary.json`` when present. Writes ``<run>/curve.png`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from detlab.errors import report_user_errors
from detlab.fileio import atomic_write_bytes  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (is {run_dir} a run directory written by train.py?)")
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def plot(rows: list[dict[str, float]], title: str) -> bytes:
    epochs = [r["epoch"] for r in rows]
    fig, (losses, metrics) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train/loss_cls", "C0-"), ("val/loss_cls", "C0--"), ("train/loss_box", "C1-"),
                       ("val/loss_box", "C1--")):
        losses.plot(epochs, [r.get(key, float("nan")) for r in rows], style, label=key)
    losses.set_xlabel("epoch")
    losses.set_title("losses (unweighted)")
    losses.legend(fontsize=8)
    for key in ("val/recall", "val/precision", "val/miou", "val/ap50"):
        metrics.plot(epochs, [r.get(key, float("nan")) for r in rows], marker=".", label=key)
    metrics.set_ylim(0, 1)
    metrics.set_xlabel("epoch")
    metrics.set_title("val metrics at score 0.5, IoU 0.5 (AP50: all scores)")
    metrics.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    rows = read_metrics(args.run_dir)
    out = args.out or args.run_dir / "curve.png"
    atomic_write_bytes(out, plot(rows, args.title or str(args.run_dir)))
    print(f"written {out}")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
