"""``from detlab import Detector``: a checkpoint or its ONNX export on an image from Python gives the
boxes and scores predict.py writes for it (detlab.predictor, one prediction path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detlab import Detections, Detector
from detlab.config import PredictConfig
from detlab.errors import UserError
from detlab.predictor import PredictError, predict_images

from conftest import untrained_checkpoint_with_photos

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained ssd_slim checkpoint (160x128 input, ``eval.score_threshold=0.3``) and a folder of
    three synthetic val images at their own size (320x256: boxes are mapped back from the input size)."""
    return untrained_checkpoint_with_photos(tmp_path_factory.mktemp("detector"), photos=3)


def assert_as_written(detections: Detections, entries: list[dict]) -> None:
    """``detections`` are the JSON's entries: the same count and order, boxes and scores equal to 1e-5
    once rounded as predictions.json rounds them (2 and 5 decimals), and within that rounding unrounded."""
    boxes, scores = detections
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and boxes.shape == (len(scores), 4)
    written_boxes = np.array([e["box"] for e in entries], dtype=np.float64).reshape(-1, 4)
    written_scores = np.array([e["score"] for e in entries], dtype=np.float64)
    assert len(scores) == len(entries)
    np.testing.assert_allclose([[round(float(v), 2) for v in box] for box in boxes.reshape(-1, 4)],
                               written_boxes.reshape(-1, 4), rtol=0, atol=1e-5)
    np.testing.assert_allclose([round(float(s), 5) for s in scores], written_scores, rtol=0, atol=1e-5)
    assert np.all(np.abs(boxes - written_boxes) <= 0.005 + 1e-4)
    assert np.all(np.abs(scores - written_scores) <= 0.000005 + 1e-7)


def test_predict_gives_the_boxes_predict_py_writes(checkpoint, tmp_path):
    path, photos = checkpoint
    predict_images(PredictConfig(checkpoint=str(path), source=str(photos)), out_dir=tmp_path)
    written = json.loads((tmp_path / "predictions.json").read_text())
    detector = Detector.load(path)
    assert detector.backend == "torch" and detector.settings.score_threshold == 0.3
    assert detector.input_size == (160, 128)
    assert sum(len(v) for v in written.values()) > 0
    for name, entries in written.items():
        detections = detector.predict(photos / name)
        assert isinstance(detections, Detections)
        assert_as_written(detections, entries)
        assert detections.boxes[:, 2:].max() > 160 or detections.boxes[:, 3].max() > 128  # the 320x256 image's pixels


def test_a_path_an_array_a_view_and_a_pil_image_give_the_same_faces(checkpoint):
    from PIL import Image

    path, photos = checkpoint
    image = sorted(photos.iterdir())[0]
    detector = Detector.load(str(path), device="cpu")
    expected = detector.predict(str(image))
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    read_only = rgb.copy()
    read_only.flags.writeable = False
    for same in (image, rgb, cv2.imread(str(image))[..., ::-1], read_only, Image.open(image)):
        boxes, scores = detector.predict(same)
        assert np.array_equal(boxes, expected.boxes) and np.array_equal(scores, expected.scores)
    assert np.array_equal(rgb, cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB))  # the input is untouched
    several = detector.predict([image, rgb])
    assert len(several) == 2 and all(np.array_equal(d.scores, expected.scores) for d in several)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((64, 64), dtype=np.uint8), "HxWx3, uint8; got shape \\(64, 64\\)"),
    (np.zeros((64, 64, 3), dtype=np.float32), "dtype float32"),
    (np.zeros((64, 64, 4), dtype=np.uint8), "got shape \\(64, 64, 4\\)"),
    (42, "cannot predict on a int"),
])
def test_what_predict_cannot_take_is_one_clear_error(checkpoint, bad, message):
    path, _ = checkpoint
    with pytest.raises(PredictError, match=message):
        Detector.load(path).predict(bad)


def test_a_folder_a_missing_file_and_bad_settings_are_user_errors(checkpoint, tmp_path):
    path, photos = checkpoint
    detector = Detector.load(path)
    with pytest.raises(PredictError, match="a folder; Detector.predict takes one image"):
        detector.predict(photos)
    with pytest.raises(UserError, match="file not found"):
        detector.predict(tmp_path / "missing.jpg")
    with pytest.raises(PredictError, match="unknown setting\\(s\\) score_treshold"):
        Detector.load(path, score_treshold=0.2)
    with pytest.raises(UserError, match="eval.score_threshold"):
        Detector.load(path, score_threshold=5)


def test_settings_override_the_checkpoints_as_on_the_command_line(checkpoint, tmp_path):
    path, photos = checkpoint
    image = sorted(photos.iterdir())[0]
    run = PredictConfig(checkpoint=str(path), source=str(image))
    run.eval.score_threshold, run.eval.max_detections, run.eval.input_size = 0.0, 7, 256
    predict_images(run, ["score_threshold", "max_detections", "input_size"], out_dir=tmp_path)
    [entries] = json.loads((tmp_path / "predictions.json").read_text()).values()
    detector = Detector.load(path, score_threshold=0.0, max_detections=7, input_size=256)
    assert detector.input_size == 256 and len(entries) == 7
    assert_as_written(detector.predict(image), entries)


@pytest.mark.slow
def test_predict_equals_predict_py_for_the_checkpoint_and_its_onnx_file(checkpoint, tmp_path):
    """predict.py itself (a subprocess) on the folder, with the checkpoint and with its ONNX export
    (scripts/export.py): for each image the JSON it writes is what ``.predict`` returns."""
    pytest.importorskip("onnxruntime")
    path, photos = checkpoint
    exported = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "scripts/export.py", f"checkpoint={path}", f"out={exported}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for backend, model in (("torch", path), ("onnx", exported)):
        proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={model}", f"backend={backend}",
                               f"source={photos}", f"out={tmp_path / backend}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        written = json.loads((tmp_path / backend / "predictions.json").read_text())
        assert sorted(written) == sorted(p.name for p in photos.iterdir()) and sum(map(len, written.values())) > 0
        detector = Detector.load(model)
        assert detector.backend == backend and f"backend={backend}" in repr(detector)
        for name, entries in written.items():
            assert_as_written(detector.predict(photos / name), entries)
