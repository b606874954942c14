"""predict.py (and detlab.predictor behind it): an untrained ssd_slim checkpoint on a few synthetic images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detlab.config import PredictConfig
from detlab.data import build_datasets
from detlab.predictor import PredictError, find_images, predict_images

from conftest import save_untrained_checkpoint, tiny_predict_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An untrained ssd_slim checkpoint (160x128 input) and a folder ``photos/nested`` of three synthetic
    val images at the input size, plus ``big/`` with the same images enlarged 2x by pixel repetition."""
    root = tmp_path_factory.mktemp("predict")
    cfg = tiny_predict_config(root)
    cfg.eval.score_threshold = 0.3
    path = root / "last.pt"
    save_untrained_checkpoint(cfg, path)
    _, val = build_datasets(cfg)
    small, big = root / "photos" / "nested", root / "big"
    small.mkdir(parents=True)
    big.mkdir()
    for record in val.records[:3]:
        rgb = cv2.imread(str(val.images_dir / record.path))
        at_input = cv2.resize(rgb, (160, 128), interpolation=cv2.INTER_AREA)
        name = Path(record.path).with_suffix(".png").name  # lossless: the two copies hold the same pixels
        cv2.imwrite(str(small / name), at_input)
        cv2.imwrite(str(big / name), cv2.resize(at_input, (320, 256), interpolation=cv2.INTER_NEAREST))
    return path, cfg, root / "photos", big


def test_boxes_come_back_in_the_images_pixels(trained, tmp_path):
    """An image at the input size and the same image enlarged 2x (pixel repetition, which the 2x area
    resize undoes exactly) give the same scores and boxes twice as large."""
    path, cfg, photos, big = trained
    run = PredictConfig(checkpoint=str(path), source=str(photos))
    result = predict_images(run, out_dir=tmp_path / "small")
    at_input = json.loads((tmp_path / "small" / "predictions.json").read_text())
    assert result["images"] == 3 and all(name.startswith("nested/") for name in at_input)
    assert result["settings"]["input_size"] == [160, 128] and result["settings"]["score_threshold"] == 0.3
    predict_images(PredictConfig(checkpoint=str(path), source=str(big)), out_dir=tmp_path / "big")
    enlarged = json.loads((tmp_path / "big" / "predictions.json").read_text())
    assert sum(len(v) for v in at_input.values()) > 0
    for name, boxes in at_input.items():
        twice = enlarged[name.removeprefix("nested/")]
        assert [b["score"] for b in twice] == [b["score"] for b in boxes]
        assert all(b["score"] >= 0.3 for b in boxes)
        assert np.allclose([b["box"] for b in twice], [[2 * v for v in b["box"]] for b in boxes], atol=0.02)
    drawn = cv2.imread(str(tmp_path / "big" / "images" / Path(next(iter(enlarged))).with_suffix(".jpg")))
    assert drawn.shape == (256, 320, 3)


@pytest.mark.slow
def test_cli_writes_images_json_and_the_wider_layout_and_takes_eval_overrides(trained, tmp_path):
    path, _, photos, _ = trained
    image = sorted(photos.rglob("*.png"))[0]
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={path}", f"source={image}", f"out={tmp_path}",
                           "eval.score_threshold=0.0", "eval.max_detections=7", "save_wider=true"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 1 and result["faces"] == 7 and result["settings"]["max_detections"] == 7
    boxes = json.loads((tmp_path / "predictions.json").read_text())[image.name]
    assert len(boxes) == 7 and all(b["score"] >= 0.0 for b in boxes)
    assert (tmp_path / "images" / image.with_suffix(".jpg").name).is_file()
    submission = list((tmp_path / "wider").rglob("*.txt"))
    assert len(submission) == 1 and submission[0].read_text().splitlines()[1] == "7"
    assert "predict:" in proc.stderr  # tqdm progress


@pytest.mark.slow
@pytest.mark.parametrize("make_source, message", [
    (lambda root: root / "missing.jpg", "no such file or folder"),
    (lambda root: root / "empty", "no image"),
    (lambda root: root / "notes.txt", "not an image or a video file"),
])
def test_bad_sources_are_one_clear_line(trained, tmp_path, make_source, message):
    path, _, _, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    (tmp_path / "notes.txt").write_text("hello")
    source = make_source(tmp_path)
    with pytest.raises(PredictError, match=message):
        find_images(source)
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={path}", f"source={source}",
                           f"out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_checkpoint_not_written_by_train_py_and_an_unreadable_image_fail_clearly(trained, tmp_path):
    _, _, photos, _ = trained
    foreign = tmp_path / "imagenet.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, foreign)
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={foreign}", f"source={photos}",
                           f"out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "expected a dict with 'model' and 'config'" in proc.stderr
    assert not (tmp_path / "out" / "predictions.json").exists()

    path, _, _, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "face.jpg").write_bytes(b"not a jpeg")
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={path}", f"source={broken}",
                           f"out={tmp_path / 'out2'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.strip().splitlines() if line and not line.startswith("predict:")]
    assert proc.returncode == 2 and len(errors) == 1 and "face.jpg" in errors[0]  # beside tqdm's progress


@pytest.mark.slow
def test_a_bad_eval_value_names_the_key_before_anything_is_written(trained, tmp_path):
    path, _, photos, _ = trained
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={path}", f"source={photos}",
                           f"out={tmp_path}", "eval.score_threshold=5"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "eval.score_threshold" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "predictions.json").exists()


def _write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames[0].shape[1], frames[0].shape[0]))
    for frame in frames:
        writer.write(frame)
    writer.release()


@pytest.mark.slow
def test_a_video_gives_a_drawn_video_and_an_entry_per_frame(trained, tmp_path):
    """Six frames (three images, twice): six JSON entries named <video>/<frame>, a drawn .mp4 of six
    frames at the video's size, and the same boxes on a frame and on its repeat (the codec's key frames
    aside, repeats decode alike, so the check allows the JSON's rounding only)."""
    path, _, photos, _ = trained
    images = [cv2.imread(str(p)) for p in sorted(photos.rglob("*.png"))]
    video = tmp_path / "clip.mp4"
    _write_video(video, [image for image in images for _ in range(2)])
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={path}", f"source={video}",
                           f"out={tmp_path / 'out'}", "eval.score_threshold=0.0", "eval.max_detections=5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "30 faces on 6 frames" in proc.stdout and "frame" in proc.stderr  # tqdm counts frames
    per_frame = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert list(per_frame) == [f"clip.mp4/{i:06d}" for i in range(6)]
    assert all(len(boxes) == 5 for boxes in per_frame.values())
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    drawn = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        drawn.append(frame)
    assert len(drawn) == 6 and drawn[0].shape == images[0].shape
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.slow
def test_an_unreadable_video_and_save_wider_on_a_video_are_one_line(trained, tmp_path):
    path, _, _, _ = trained
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={path}", f"source={broken}",
                           f"out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no frame can be read from this video" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    with pytest.raises(PredictError, match="save_wider=true: the WIDER submission layout is for images"):
        predict_images(PredictConfig(checkpoint=str(path), source=str(broken), save_wider=True), out_dir=tmp_path)
