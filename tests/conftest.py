"""Shared test fixtures: tiny configs, the real data (WIDER FACE, pretrained weights), WIDER ground truth
and fabricated runs."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pytest
from scipy.io import savemat

# metrics.csv's own column list, so the fabricated runs cannot drift from what runs write.
from detlab.run_record import METRIC_COLUMNS


REPO = Path(__file__).resolve().parents[1]

# The real data of the tests is found as any run finds it, through paths.data_dir (DETLAB_DATA; the
# pretrained weights under <paths.data_dir>/pretrained unless DETLAB_PRETRAINED says otherwise). Unless
# the environment sets it, it is the shared folder beside the repository: ../shared/widerface,
# ../shared/pretrained. Subprocesses (train.py, evaluate.py) inherit it. Tests skip when the data is absent.
os.environ.setdefault("DETLAB_DATA", str(REPO.parent / "shared"))


def find_widerface() -> Path | None:
    """The real WIDER FACE folder (``<paths.data_dir>/widerface``); None if absent."""
    from detlab.paths import widerface_root

    root = widerface_root()
    return root if root.is_dir() else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]):
    """A test that trains a run or starts a subprocess or process, in its body or in a fixture it is
    the first to need, must be marked ``slow``, so that ``python -m pytest -m "not slow"`` stays a
    quick loop: an unmarked one fails, naming what it did."""
    if item.get_closest_marker("slow"):
        yield
        return
    import multiprocessing.process
    import subprocess

    from detlab.engine.trainer import Trainer

    def refuse(what: str):
        def refused(*args: Any, **kwargs: Any) -> None:
            pytest.fail(f"{item.nodeid} {what}: mark it @pytest.mark.slow", pytrace=False)

        return refused

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse("starts a subprocess"))
        patch.setattr(multiprocessing.process.BaseProcess, "start", refuse("starts a process"))
        patch.setattr(Trainer, "run", refuse("trains a run"))
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """One tiny synthetic dataset folder for the session (generated on first use, then re-used)."""
    return tmp_path_factory.mktemp("synthetic")


def edited_copy(source: Path, folder: Path, old: str, new: str) -> Path:
    """A copy of ``source`` in ``folder`` with the first ``old`` replaced by ``new`` (which must be there)."""
    text = source.read_text()
    assert old in text
    path = folder / source.name
    path.write_text(text.replace(old, new, 1))
    return path


def compose_tiny_config(root: Path, *overrides: str):
    """``configs/config.yaml`` as train.py composes it, shrunk to a 20-image 160x128 set, 1 epoch of
    batch 8, with ``overrides`` on top."""
    from detlab.config import compose_config

    base = [
        f"dataset.root={root}", "dataset.synthetic.num_images=20", "dataset.synthetic.image_width=160",
        "dataset.synthetic.image_height=128", "model.input_width=160", "model.input_height=128",
        "train.epochs=1", "train.batch_size=8", "train.log_every=1", "eval.num_logged_images=2",
        "diagnosis.grad_norm_every=1", "diagnosis.grad_norm_every_first_part=1",
    ]
    return compose_config(overrides=[*base, *overrides])


def tiny_predict_config(root: Path, num_images: int = 12):
    """The prediction tests' config: ``num_images`` synthetic images in ``root/synthetic`` (a quarter
    of them val), a 160x128 ssd_slim."""
    from detlab.config import Config

    cfg = Config()
    cfg.dataset.root = str(root / "synthetic")
    cfg.dataset.synthetic.num_images = num_images
    cfg.dataset.synthetic.val_fraction = 0.25
    cfg.model.input_width, cfg.model.input_height = 160, 128
    return cfg


def save_untrained_checkpoint(cfg, path: Path):
    """A train.py-shaped checkpoint of a freshly built (seed 0) model of ``cfg``; returns the model."""
    import torch
    from omegaconf import OmegaConf

    from detlab.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "epoch": 1, "step": 2}, path)
    return model


def untrained_checkpoint_with_photos(root: Path, photos: int) -> tuple[Path, Path]:
    """An untrained ssd_slim checkpoint of the prediction tests' config (160x128 input,
    ``eval.score_threshold=0.3``) and a folder of ``photos`` synthetic val images at their own size."""
    import shutil

    from detlab.data import build_datasets

    cfg = tiny_predict_config(root)
    cfg.eval.score_threshold = 0.3
    path = root / "last.pt"
    save_untrained_checkpoint(cfg, path)
    _, val = build_datasets(cfg)
    folder = root / "photos"
    folder.mkdir()
    for record in val.records[:photos]:
        shutil.copy(val.images_dir / record.path, folder / Path(record.path).name)
    return path, folder


def tiny_sweep_overrides(tmp_path: Path, sweep_dir: Path, epochs: int = 2) -> list[str]:
    """``train.py -m`` overrides for a tiny sweep (20 synthetic images at 160x128, batch 8) into ``sweep_dir``."""
    return [f"dataset.root={tmp_path / 'synthetic'}", "dataset.synthetic.num_images=20",
            "dataset.synthetic.image_width=160", "dataset.synthetic.image_height=128", "model.input_width=160",
            "model.input_height=128", f"train.epochs={epochs}", "train.batch_size=8", "eval.num_logged_images=1",
            "train.sample_grid=0", f"hydra.sweep.dir={sweep_dir}"]


@pytest.fixture
def tiny_config():
    """``tiny_config(root, *overrides) -> Config``: see ``compose_tiny_config``."""
    return compose_tiny_config


@pytest.fixture
def widerface_root() -> Path:
    """The real WIDER FACE folder (official layout); skips the test when it is absent."""
    root = find_widerface()
    if root is None:
        from detlab.paths import widerface_root as expected

        pytest.skip(f"WIDER FACE not found in {expected()} (set DETLAB_DATA to the folder holding widerface/)")
    return root


@pytest.fixture
def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 file in ``paths.pretrained_dir``; skips the test when it is absent."""
    from detlab.model.backbones import MOBILENET_V2_FILE
    from detlab.paths import configured_paths

    path = Path(configured_paths().pretrained_dir).expanduser() / MOBILENET_V2_FILE
    if not path.is_file():
        pytest.skip(f"{path} not found (set DETLAB_PRETRAINED, or DETLAB_DATA to the folder holding pretrained/)")
    return path


def write_ground_truth(folder: Path, events: dict[str, dict[str, tuple[list, dict[str, list[int]]]]]) -> Path:
    """Write the four .mat files in the official cell layout.

    ``events[event][name] = (faces x y w h, {"easy": [1-based kept indices], "medium": [...], "hard": [...]})``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_events = len(events)
    event_list = np.empty((n_events, 1), dtype=object)
    file_list = np.empty((n_events, 1), dtype=object)
    face_list = np.empty((n_events, 1), dtype=object)
    keep = {s: np.empty((n_events, 1), dtype=object) for s in ("easy", "medium", "hard")}
    for i, (event, images) in enumerate(events.items()):
        event_list[i, 0] = event
        files = np.empty((len(images), 1), dtype=object)
        faces = np.empty((len(images), 1), dtype=object)
        kept = {s: np.empty((len(images), 1), dtype=object) for s in keep}
        for j, (name, (boxes, lists)) in enumerate(images.items()):
            files[j, 0] = name
            faces[j, 0] = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            for s in keep:
                kept[s][j, 0] = np.asarray(lists.get(s, []), dtype=np.uint16).reshape(-1, 1)  # as in the official files
        file_list[i, 0], face_list[i, 0] = files, faces
        for s in keep:
            keep[s][i, 0] = kept[s]
    savemat(folder / "wider_face_val.mat", {"event_list": event_list, "file_list": file_list,
                                             "face_bbx_list": face_list})
    for s in keep:
        savemat(folder / f"wider_{s}_val.mat", {"event_list": event_list, "file_list": file_list,
                                                 "face_bbx_list": face_list, "gt_list": keep[s]})
    return folder


@pytest.fixture
def write_wider_gt():
    """``write_wider_gt(folder, events) -> folder``: official-layout WIDER ground truth .mat files."""
    return write_ground_truth


# Fabricated run and sweep directories that follow the run-directory contract (docs/architecture.md).
#
#     the make_fake_run / make_fake_sweep fixtures (PAPER_BOX_WEIGHTS by default)
#
# Curves are closed-form so tests can assert exact numbers. For box weight ``w``, planned epochs ``E``
# and epoch ``e`` (1-based), with ``q = 1 / (1 + |log10 w|)``, ``cls_stuck = max(0, log10 w)`` and
# ``box_stuck = max(0, -log10 w)``:
#
# - healthy runs: ``train/loss_cls = 0.5 + 1.5 / e + 0.5 * cls_stuck``,
#   ``train/loss_box = 0.3 + 1.2 / e + 0.4 * box_stuck``, val losses = 1.1 x train,
#   ``val/miou = 0.5 * q * e / E``, ``tp = round(160 * miou)``, ``fn = 100 - tp``,
#   ``fp = round(20 + 60 * (1 - q))``, ``precision = tp / (tp + fp)``, ``recall = tp / 100``,
#   ``ap50 = 0.9 * precision * recall``;
# - diverged runs: ``train/loss_cls = 3 ** (e - 1)``, ``train/loss_box = 10 ** (e - 1)``, val losses =
#   1.1 x train, ``val/miou = 0.02 / e``;
# - ``train/loss_total = class_weight * loss_cls + box_weight * loss_box``; ``step = e * steps_per_epoch``;
# - stages: epoch 1 is early, epochs above ``0.7 * E`` late, the rest mid; a stage's losses are the
#   mean of its rows' train losses (only stages with rows are written);
# - ``wall_time_s = 10 * epochs + 2.5``.
PAPER_BOX_WEIGHTS = (0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
DEFAULT_MESSAGES = {
    "diverged": "non-finite loss (nan) at step {step}",
    "failed": "RuntimeError: CUDA out of memory",
    "stopped": "early stopping: val/miou did not improve for 3 epochs",
}


def fake_history(box_weight: float, epochs: int, epochs_planned: int, diverged: bool = False,
                 class_weight: float = 1.0, steps_per_epoch: int = 50) -> list[dict[str, float]]:
    """metrics.csv rows for epochs ``1..epochs`` (formulas in the module docstring)."""
    q = 1.0 / (1.0 + abs(math.log10(box_weight)))
    cls_stuck, box_stuck = max(0.0, math.log10(box_weight)), max(0.0, -math.log10(box_weight))
    rows = []
    for e in range(1, epochs + 1):
        if diverged:
            cls, box, miou = 3.0 ** (e - 1), 10.0 ** (e - 1), 0.02 / e
        else:
            cls = 0.5 + 1.5 / e + 0.5 * cls_stuck
            box = 0.3 + 1.2 / e + 0.4 * box_stuck
            miou = 0.5 * q * e / epochs_planned
        tp = round(160 * miou)
        fp = round(20 + 60 * (1 - q))
        fn = 100 - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / 100
        rows.append({
            "epoch": e, "step": e * steps_per_epoch, "lr": 0.01,
            "train/loss_cls": cls, "train/loss_box": box, "train/loss_total": class_weight * cls + box_weight * box,
            "val/loss_cls": 1.1 * cls, "val/loss_box": 1.1 * box,
            "val/loss_total": 1.1 * (class_weight * cls + box_weight * box),
            "val/miou": miou, "val/mean_tp_iou": 0.7, "val/tp": tp, "val/fp": fp, "val/fn": fn,
            "val/precision": precision, "val/recall": recall,
            "val/f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "val/ap50": 0.9 * precision * recall, "val/pred_per_image": 2.0, "val/pred_mean_size": 40.0,
            "train_time_s": 9.0, "val_time_s": 1.0,
        })
    return rows


def fake_stages(history: Sequence[dict[str, float]], epochs_planned: int) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, float]]] = {}
    for row in history:
        e = row["epoch"]
        stage = "early" if e == 1 else "late" if e > 0.7 * epochs_planned else "mid"
        groups.setdefault(stage, []).append(row)
    return {stage: {key: sum(r[f"train/{key}"] for r in rows) / len(rows)
                    for key in ("loss_cls", "loss_box", "loss_total")}
            for stage, rows in groups.items()}


def write_metrics_csv(path: Path, rows: Sequence[dict[str, Any]], partial_last_line: bool = False) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    text = buffer.getvalue()
    if partial_last_line:  # a writer caught mid-line: a few cells, no newline
        text += f"{len(rows) + 1},{(len(rows) + 1) * 50},0.01,0.7"
    path.write_text(text)


def make_fake_run(run_dir: Path | str, box_weight: float, status: str = "completed", epochs: int = 4,
                  epochs_planned: Optional[int] = None, class_weight: float = 1.0,
                  step: Optional[int] = None, message: Optional[str] = None,
                  findings: Optional[list[dict[str, Any]]] = None, history: Optional[list[dict[str, Any]]] = None,
                  write_summary: bool = True, write_metrics: bool = True, partial_last_line: bool = False,
                  hydra: bool = True, extra_overrides: Sequence[str] = ("+experiment=box_weight_sweep",),
                  steps_per_epoch: int = 50, test: Optional[dict[str, Any]] = None) -> Path:
    """Write a run directory: ``.hydra/`` (overrides, config), ``metrics.csv``, ``summary.json``.

    ``epochs``: epochs completed (rows in metrics.csv). ``epochs_planned`` defaults to ``epochs``.
    A "diverged" run gets exploding curves and a step half-way into the next epoch; a "failed" run
    with ``write_metrics=False`` and ``epochs=0`` is one that crashed before its first epoch.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs_planned = epochs_planned or max(epochs, 1)
    if history is None:
        history = fake_history(box_weight, epochs, epochs_planned, diverged=status == "diverged",
                               class_weight=class_weight, steps_per_epoch=steps_per_epoch)
    overrides = [f"loss.box_weight={box_weight:g}", *extra_overrides]
    if hydra:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run_dir / ".hydra" / "config.yaml").write_text(
            f"loss:\n  class_weight: {class_weight}\n  box_weight: {box_weight}\n"
            f"train:\n  epochs: {epochs_planned}\n  batch_size: 32\n")
    if write_metrics:
        write_metrics_csv(run_dir / "metrics.csv", history, partial_last_line=partial_last_line)
    if write_summary:
        if step is None:
            step = epochs * steps_per_epoch + (steps_per_epoch // 2 if status == "diverged" else 0)
        if message is None:
            message = DEFAULT_MESSAGES.get(status, "").format(step=step)
        scored = [r for r in history if r.get("val/miou") is not None]
        summary = {
            "status": status, "message": message, "step": step, "epochs": epochs,
            "epochs_planned": epochs_planned,
            "hparams": {"loss.class_weight": class_weight, "loss.box_weight": box_weight,
                        "train.epochs": epochs_planned},
            "overrides": overrides,
            "best": dict(max(scored, key=lambda r: r["val/miou"])) if scored else {},
            "final": dict(history[-1]) if history else {},
            "stages": fake_stages(history, epochs_planned),
            "findings": list(findings or []),
            "wall_time_s": 10.0 * epochs + 2.5,
        }
        if test is not None:
            summary["test"] = test
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def make_fake_sweep(sweep_dir: Path | str, box_weights: Sequence[float] = PAPER_BOX_WEIGHTS,
                    epochs_planned: int = 20, diverge_at: Optional[dict[float, int]] = None,
                    fail: Sequence[float] = (), running: dict[float, int] | None = None) -> Path:
    """A Hydra-like multirun folder, one ``loss.box_weight=W`` run per weight.

    ``diverge_at``: ``{weight: epochs completed before it diverged}`` (default ``{0.01: 2, 10: 1}``:
    imbalanced weights fail early, as in the paper's Figure 5); ``fail``: weights whose run crashed
    before its first epoch; ``running``: ``{weight: epochs so far}`` (no summary.json yet).
    """
    sweep_dir = Path(sweep_dir)
    diverge_at = {0.01: 2, 10: 1} if diverge_at is None else diverge_at
    running = running or {}
    (sweep_dir).mkdir(parents=True, exist_ok=True)
    (sweep_dir / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for w in box_weights:
        run_dir = sweep_dir / f"loss.box_weight={w:g}"
        if w in fail:
            make_fake_run(run_dir, w, status="failed", epochs=0, epochs_planned=epochs_planned,
                          write_metrics=False, step=0)
        elif w in diverge_at:
            make_fake_run(run_dir, w, status="diverged", epochs=diverge_at[w], epochs_planned=epochs_planned,
                          findings=[{"detector": "loss_imbalance", "stage": "early", "step": 20, "epoch": 1,
                                     "evidence": {"grad_ratio": 85.0}, "remedy": "rebalance the loss weights"}])
        elif w in running:
            make_fake_run(run_dir, w, status="running", epochs=running[w], epochs_planned=epochs_planned,
                          write_summary=False, partial_last_line=True)
        else:
            findings = []
            if abs(math.log10(w)) >= 1:
                findings = [{"detector": "avoidance", "stage": "early", "step": 50, "epoch": 1,
                             "evidence": {"pred_per_image": 0.1}, "remedy": "lower the score floor"}]
            make_fake_run(run_dir, w, status="completed", epochs=epochs_planned, epochs_planned=epochs_planned,
                          findings=findings)
    return sweep_dir


@pytest.fixture(scope="session", name="make_fake_run")
def make_fake_run_fixture():
    """``make_fake_run(run_dir, box_weight, ...)``: one fabricated run directory (see above)."""
    return make_fake_run


@pytest.fixture(scope="session", name="make_fake_sweep")
def make_fake_sweep_fixture():
    """``make_fake_sweep(sweep_dir, box_weights=PAPER_BOX_WEIGHTS, ...)``: a fabricated sweep (see above)."""
    return make_fake_sweep
