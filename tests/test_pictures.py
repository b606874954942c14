"""The run's pictures: the detection PR curve, the error galleries, the training samples, the plots/ PNGs."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlab.config import EvalConfig
from detlab.run_record import METRIC_COLUMNS
from detlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detlab.engine.pictures import TILE, ErrorGallery
from detlab.engine.trainer import train
from detlab.metrics import DetectionEvaluator


def _one_image_evaluation() -> DetectionEvaluator:
    """Faces A (0-10), B (50-60), C (80-90); predictions: on A at 0.9, a background box at 0.6, on B at 0.3."""
    evaluator = DetectionEvaluator.from_config(EvalConfig())
    evaluator.update([{"boxes": torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60.]]),
                       "scores": torch.tensor([0.9, 0.6, 0.3])}],
                     [torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90.]])])
    return evaluator


def test_pr_curve_counts_every_face_and_meets_the_metrics_at_the_score_threshold():
    evaluator = _one_image_evaluation()
    curve = evaluator.pr_curve(num_thresholds=11)
    assert curve["tp"].tolist() == [2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 0]  # B counts from 0.3 down; A up to 0.9
    assert curve["fp"].tolist() == [1] * 7 + [0] * 4
    assert curve["fn"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3]  # C is never found
    assert curve["precision"][-1] == 0.0 and curve["recall"][0] == pytest.approx(2 / 3)
    at_half = list(curve["thresholds"]).index(0.5)
    metrics = evaluator.compute()
    assert (curve["precision"][at_half], curve["recall"][at_half]) == pytest.approx((metrics["precision"],
                                                                                     metrics["recall"]))


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    return (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_error_gallery_crops_the_false_positives_and_the_missed_faces_by_size():
    """A 200x100 input of an image twice as large (scale 2): a red square where a false positive scores
    0.9, a blue square where a small face is missed, a matched large face; one FP below the threshold."""
    rgb = np.full((100, 200, 3), 128, dtype=np.uint8)
    rgb[20:40, 20:40] = (255, 0, 0)  # under the false positive (input pixels)
    rgb[70:74, 150:154] = (0, 0, 255)  # the missed small face
    images = _normalised(rgb).unsqueeze(0)
    faces = torch.tensor([[300, 8, 400, 108], [300, 140, 308, 148.]])  # original pixels: large (matched), small
    predictions = [{"boxes": torch.tensor([[300, 8, 400, 108], [40, 40, 80, 80], [0, 0, 10, 10.]]),
                    "scores": torch.tensor([0.95, 0.9, 0.2])}]
    gallery = ErrorGallery(score_threshold=0.5, iou_threshold=0.5, size_edges=[16, 64], per_size=4)
    gallery.update(images, [{"scale": torch.tensor([2.0, 2.0])}], predictions, [faces])
    assert gallery.totals["false_positives"].tolist() == [0, 1, 0]  # the 40 px FP is medium; 0.2 is below 0.5
    assert gallery.totals["missed_faces"].tolist() == [1, 0, 0]  # the 8 px face is small
    pictures = gallery.pictures()
    fp_row, missed_row = pictures["false_positives"], pictures["missed_faces"]
    assert fp_row.shape == missed_row.shape == (3 * (TILE + 2) + 2, 64 + 4 * (TILE + 2) + 2, 3)
    centre = (2 + (TILE + 2) * 1 + TILE // 2, 64 + 2 + TILE // 2)  # medium row, first tile
    assert fp_row[centre].tolist() == [255, 0, 0]
    centre = (2 + TILE // 2, 64 + 2 + TILE // 2)  # small row, first tile
    assert missed_row[centre].tolist() == [0, 0, 255]
    empty = (2 + (TILE + 2) * 2 + TILE // 2, 64 + 2 + TILE // 2)  # large row: nothing
    assert fp_row[empty].tolist() == [40, 40, 40]


def _event_tags(run_dir: Path) -> tuple[set[str], set[str]]:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return set(events.Tags()["images"]), set(events.Tags()["tensors"])


@pytest.mark.slow
def test_a_run_draws_its_pictures_and_they_do_not_change_its_numbers(synthetic_root, tiny_config, tmp_path):
    with_pictures = train(tiny_config(synthetic_root, "train.epochs=2", "eval.gallery_every=1"), tmp_path / "on")
    images, tensors = _event_tags(tmp_path / "on")
    assert {"train/augmented_samples", "gallery/false_positives", "gallery/missed_faces", "val/predictions"} <= images
    assert "val/pr_curve" in tensors
    for name in ("curves.png", "pr_curve.png", "train_samples.jpg"):
        picture = cv2.imread(str(tmp_path / "on" / "plots" / name))
        assert picture is not None and min(picture.shape[:2]) > 100, name
    rows = list(csv.DictReader(open(tmp_path / "on" / "metrics.csv")))
    assert list(rows[0]) == METRIC_COLUMNS and all(float(r["pictures_time_s"]) > 0 for r in rows)

    without = train(tiny_config(synthetic_root, "train.epochs=2", "train.sample_grid=0", "train.plots=false",
                                "eval.pr_curve=false", "eval.gallery_every=0"), tmp_path / "off")
    images, tensors = _event_tags(tmp_path / "off")
    assert images == {"val/predictions"} and "val/pr_curve" not in tensors
    assert not (tmp_path / "off" / "plots").exists()
    for key, value in with_pictures["final"].items():
        if not key.endswith("_time_s"):
            assert without["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("override, key", [("eval.gallery_size=0", "eval.gallery_size"),
                                           ("eval.gallery_every=-1", "eval.gallery_every"),
                                           ("train.sample_grid=100", "train.sample_grid")])
def test_picture_settings_are_validated_with_the_key_named(synthetic_root, tiny_config, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tiny_config(synthetic_root, override)
