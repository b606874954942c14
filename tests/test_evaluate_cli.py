"""evaluate.py (and detlab.evaluation behind it) on a tiny synthetic dataset and an untrained ssd_slim checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from detlab.config import Config, EvaluateConfig
from detlab.data import build_datasets, build_loader
from detlab.runtime.checkpoint import CheckpointError
from detlab.evaluation import EvaluationError, eval_keys_of, evaluate_checkpoint, format_table
from detlab.model import build_model

REPO = Path(__file__).resolve().parents[1]
KEYS = ("miou", "mean_tp_iou", "tp", "fp", "fn", "precision", "recall", "f1", "ap50", "num_gt", "num_pred")


def tiny_config(root: Path) -> Config:
    cfg = Config()
    cfg.dataset.root = str(root / "synthetic")
    cfg.dataset.synthetic.num_images = 12
    cfg.dataset.synthetic.val_fraction = 0.25
    cfg.model.input_width, cfg.model.input_height = 160, 128
    cfg.eval.score_threshold = 0.3  # an untrained model scores around 0.5: keep some above, some below
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(root)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = root / "last.pt"
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "epoch": 2, "step": 7}, path)
    return path, cfg, root


def wider_ground_truth_for(records, folder: Path, write_wider_gt) -> Path:
    """Official-layout .mat files for the val records, every face kept in every setting."""
    events: dict = {}
    for r in records:
        event, name = Path(r.path).parent.as_posix(), Path(r.path).stem
        boxes = np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4)
        xywh = np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
        kept = list(range(1, len(boxes) + 1))
        events.setdefault(event, {})[name] = (xywh.tolist(), {"easy": kept, "medium": kept, "hard": kept})
    return write_wider_gt(folder, events)


def test_evaluate_equals_training_validation(checkpoint):
    """The numbers of evaluate.py are those of the per-epoch validation for the same weights."""
    from detlab.engine.validation import validate
    from detlab.loss import build_criterion

    path, cfg, _ = checkpoint
    # Same batch size as the loader below: an untrained model's scores are near-ties, and the float
    # rounding of a convolution may depend on the batch size, which can flip an NMS decision.
    result = evaluate_checkpoint(EvaluateConfig(checkpoint=str(path), batch_size=3))
    assert all(k in result for k in KEYS) and "small/recall" in result and "wider" not in result
    assert result["epoch"] == 2 and result["num_images"] == 3
    assert "precision" in format_table(result)

    model = build_model(cfg.model)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    _, val = build_datasets(cfg)
    loader = build_loader(val, 3, shuffle=False, num_workers=0, seed=0)
    metrics = validate(model, loader, build_criterion(cfg, model), cfg.eval, torch.device("cpu"), step=0).metrics
    assert result["num_pred"] > 0 and result["fp"] > 0
    for key in KEYS:
        assert result[key] == pytest.approx(metrics[f"val/{key}"], abs=1e-6), key


def test_eval_keys_given_override_the_checkpoints_and_the_rest_stay(checkpoint):
    path, cfg, _ = checkpoint
    assert eval_keys_of(["checkpoint=x", "eval.nms_iou=0.3", "+eval.max_detections=5", "split=val"]) == [
        "nms_iou", "max_detections"]
    run = EvaluateConfig(checkpoint=str(path), batch_size=3)
    run.eval.nms_iou, run.eval.score_threshold = 0.3, 0.9  # only nms_iou is "given"
    result = evaluate_checkpoint(run, eval_keys=["nms_iou"])
    assert result["settings"]["nms_iou"] == 0.3
    assert result["settings"]["score_threshold"] == cfg.eval.score_threshold == 0.3  # the checkpoint's own


@pytest.mark.slow
def test_cli_wider_protocol_and_submission(checkpoint, tmp_path, write_wider_gt):
    path, cfg, _ = checkpoint
    _, val = build_datasets(cfg)
    gt_dir = wider_ground_truth_for(val.records, tmp_path / "gt", write_wider_gt)
    preds, out = tmp_path / "preds", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"checkpoint={path}", "split=val", "protocol=wider", f"gt_dir={gt_dir}",
         f"save_predictions={preds}", f"output_dir={out}", "eval.score_floor=0.05", "eval.nms_iou=0.3",
         "eval.max_detections=20", "eval.input_size=[128,96]", f"hydra.run.dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "WIDER FACE AP" in proc.stdout and "precision" in proc.stdout  # the human table came first
    assert set(result["wider"]) == {"easy", "medium", "hard"}
    assert all(k in result for k in KEYS)
    assert result["settings"]["input_size"] == [128, 96] and result["settings"]["nms_iou"] == 0.3
    assert json.loads((out / "metrics.json").read_text()) == result

    files = sorted(preds.rglob("*.txt"))
    assert len(files) == len(val.records)
    for f in files:
        text = f.read_text().splitlines()
        assert text[0] == f.stem and int(text[1]) == len(text) - 2 <= 20
        assert all(float(line.split()[4]) >= 0.05 for line in text[2:])

    # The saved folder scored alone gives the same APs.
    alone = subprocess.run([sys.executable, "-m", "detlab.wider_eval", str(preds), "--gt", str(gt_dir)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout.strip().splitlines()[-1])["wider"] == pytest.approx(result["wider"], abs=1e-12)


@pytest.mark.slow
def test_cli_rejects_unknown_keys_and_bad_values(checkpoint, tmp_path):
    path, _, _ = checkpoint
    unknown = subprocess.run([sys.executable, "evaluate.py", f"checkpoint={path}", "bogus_key=1",
                              f"hydra.run.dir={tmp_path / 'unknown'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "bogus_key" in unknown.stderr + unknown.stdout
    bad = subprocess.run([sys.executable, "evaluate.py", f"checkpoint={path}", "split=train",
                          f"hydra.run.dir={tmp_path / 'bad'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "split='train'" in bad.stderr + bad.stdout


def test_original_input_size_and_missing_checkpoint(checkpoint, tmp_path):
    path, _, _ = checkpoint
    run = EvaluateConfig(checkpoint=str(path))
    run.eval.input_size = "original"
    result = evaluate_checkpoint(run, eval_keys=["input_size"])
    assert result["num_images"] == 3 and result["settings"]["input_size"] == "original"
    assert result["num_gt"] > 0
    with pytest.raises(CheckpointError, match="file not found"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(EvaluationError, match="protocol=wider"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=str(path), protocol="wider", gt_dir=str(tmp_path / "nogt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=str(tmp_path / "junk.pt")))


def test_longer_side_images_keep_aspect_and_pad(tmp_path):
    import cv2
    import numpy as np

    from detlab.data import parse_wider_annotations
    from detlab.prediction import OriginalSizeImages

    folder = tmp_path / "images" / "0--P"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), np.full((300, 1000, 3), 128, np.uint8))
    ann = tmp_path / "gt.txt"
    ann.write_text("0--P/a.png\n1\n10 10 20 20 0 0 0 0 0 0\n")
    dataset = OriginalSizeImages(parse_wider_annotations(ann), tmp_path / "images", long_side=640)
    image, target = dataset[0]
    # 1000x300 -> 640x192 (keep aspect), padded to a multiple of 64: 640x192 already is.
    assert tuple(image.shape) == (3, 192, 640)
    assert target["scale"].tolist() == pytest.approx([1000 / 640, 300 / 192])
    dataset = OriginalSizeImages(parse_wider_annotations(ann), tmp_path / "images", long_side=500)
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 192, 512)  # 500x150 padded to 512x192 with zeros (the mean colour)
    assert float(image[:, 150:, :].abs().max()) == 0.0 and float(image[:, :, 500:].abs().max()) == 0.0
