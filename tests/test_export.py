"""scripts/export.py (detlab.export) and predict.py backend=onnx (detlab.onnx_runtime): parity with PyTorch, the CLI, the errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from detlab.config import ExportConfig, ModelConfig, PredictConfig
from detlab.data import build_datasets
from detlab.export import ExportError, export_checkpoint
from detlab.model import build_model
from detlab.onnx_runtime import OnnxModelError, load_exported
from detlab.prediction import OriginalSizeImages, predict_image
from detlab.predictor import PredictError, load_predictor

from conftest import tiny_predict_config

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An ssd_slim checkpoint (160x128) whose scores spread over (0, 1), and its four synthetic val images.

    The training init starts every anchor at p ~ 0.5 and its BatchNorm statistics do not fit the
    activations, so whole feature maps come out constant and thousands of anchors tie exactly: NMS
    would then break ties by rounding. Here the output convs are drawn wider and the BatchNorm
    statistics are measured on the images (one pass in train mode), so scores follow the image. The box
    deltas stay small, as a trained model's are (random wide deltas make boxes of thousands of pixels)."""
    from detlab.data.wider import read_image_rgb

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_predict_config(root, num_images=16)
    _, val = build_datasets(cfg)
    photos = root / "photos"
    photos.mkdir()
    for record in val.records:
        cv2.imwrite(str(photos / Path(record.path).with_suffix(".png").name), cv2.imread(str(val.images_dir / record.path)))
    prepare = OriginalSizeImages([], Path("/"), size=(160, 128)).prepare
    images = torch.stack([prepare(read_image_rgb(p))[0] for p in sorted(photos.iterdir())])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for heads, std in ((model.head.classification, 1.0), (model.head.regression, 0.1)):
            for head in heads:  # deltas of a trained model's size (O(1)), spread class logits
                (head if isinstance(head, torch.nn.Conv2d) else head[-1]).weight.normal_(std=std)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the pass
        model.train()(images)
    path = root / "last.pt"
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "epoch": 1, "step": 2}, path)
    return path, photos


def _predictions(run: PredictConfig, images: list[Path], long_side: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Unrounded (boxes, scores) per image through predict.py's own loading and prediction path; boxes
    in units of the image's longer side (float32 resolves 1.2e-4 px at 1,024 px: an absolute 1e-4 in
    pixels would ask for more than the number format holds)."""
    from detlab.data.wider import read_image_rgb

    models, settings, device, trained = load_predictor(run)
    size = None if long_side else (trained.model.input_width, trained.model.input_height)
    prepare = OriginalSizeImages([], Path("/"), long_side=long_side, size=size).prepare
    out = []
    for path in images:
        rgb = read_image_rgb(path)
        boxes, scores = predict_image(models, *prepare(rgb), device, settings)
        out.append((boxes / max(rgb.shape[:2]), scores))
    return out


def _assert_same_detections(expected, actual, atol: float = 1e-4) -> None:
    """Every image: as many detections, and each PyTorch detection has its own ONNX detection with the
    score and the four coordinates (relative to the image's longer side) within ``atol``, matched one
    to one, so two detections whose scores differ by less than the backends' rounding may swap ranks."""
    for (boxes, scores), (onnx_boxes, onnx_scores) in zip(expected, actual):
        assert len(scores) > 0 and onnx_scores.shape == scores.shape
        distance = (boxes[:, None, :] - onnx_boxes[None, :, :]).abs().amax(-1)  # [K, K]
        distance = torch.maximum(distance, (scores[:, None] - onnx_scores[None, :]).abs())
        nearest = distance.min(dim=1)
        assert float(nearest.values.max()) <= atol
        assert len(set(nearest.indices.tolist())) == len(scores)  # one to one


@pytest.mark.slow  # several seconds: kept out of the quick loop
def test_dynamic_onnx_export_matches_pytorch_on_real_wider_images(checkpoint, tmp_path, widerface_root):
    """Real WIDER val images of different aspect ratios at 320 px longer side (so several input sizes
    go through the one dynamic-size graph): the same boxes and scores as PyTorch, to 1e-4."""
    path, _ = checkpoint
    result = export_checkpoint(ExportConfig(checkpoint=str(path), out=str(tmp_path / "m.onnx")))
    assert result["input_size"] == "dynamic" and result["max_difference"] < 1e-4
    long_side = 320
    prepare = OriginalSizeImages([], Path("/"), long_side=long_side).prepare
    images, sizes = [], set()
    for candidate in sorted((widerface_root / "WIDER_val" / "images").glob("*/*.jpg"))[:400]:
        size = tuple(prepare(cv2.imread(str(candidate), cv2.IMREAD_COLOR))[0].shape)
        if size not in sizes or len(images) < 3:  # a few images, and every padded input size met once
            images.append(candidate)
            sizes.add(size)
    assert len(sizes) >= 3  # several input sizes go through the one graph
    torch_run = PredictConfig(checkpoint=str(path), source=".")
    onnx_run = PredictConfig(checkpoint=result["out"], source=".", backend="onnx")
    expected = _predictions(torch_run, images, long_side)
    actual = _predictions(onnx_run, images, long_side)
    _assert_same_detections(expected, actual)


def test_fixed_size_onnx_export_matches_pytorch_and_carries_the_config(checkpoint, tmp_path):
    path, photos = checkpoint
    result = export_checkpoint(ExportConfig(checkpoint=str(path), out=str(tmp_path / "fixed.onnx"),
                                            input_size=[160, 128]))
    assert result["input_size"] == [160, 128]
    cfg, session = load_exported(result["out"])
    assert (cfg.model.name, cfg.model.input_width, cfg.model.input_height) == ("ssd_slim", 160, 128)
    assert session.get_inputs()[0].shape[1:] == [3, 128, 160] and isinstance(session.get_inputs()[0].shape[0], str)
    images = sorted(photos.glob("*.png"))
    expected = _predictions(PredictConfig(checkpoint=str(path), source="."), images, None)
    actual = _predictions(PredictConfig(checkpoint=result["out"], source=".", backend="onnx"), images, None)
    _assert_same_detections(expected, actual)
    # a batch of 3 through the graph: each image's raw outputs are its batch-of-one outputs
    batch = np.random.default_rng(0).standard_normal((3, 3, 128, 160)).astype(np.float32)
    logits, _ = session.run(None, {"images": batch})
    single, _ = session.run(None, {"images": batch[1:2]})
    assert logits.shape[0] == 3 and np.allclose(logits[1:2], single, atol=1e-5)

    models, *_ = load_predictor(PredictConfig(checkpoint=result["out"], source=".", backend="onnx"))
    with pytest.raises(OnnxModelError, match=r"takes 160x128 images only.*eval.input_size=\[160,128\]"):
        models(320, 256)


@pytest.mark.slow  # several seconds: kept out of the quick loop
def test_the_torch_export_based_exporter_gives_the_same_file_contract(checkpoint, tmp_path):
    pytest.importorskip("onnxscript")
    path, photos = checkpoint
    result = export_checkpoint(ExportConfig(checkpoint=str(path), out=str(tmp_path / "d.onnx"), input_size=[160, 128],
                                            dynamo=True))
    assert result["max_difference"] < 1e-4
    cfg, session = load_exported(result["out"])
    assert cfg.model.name == "ssd_slim" and [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["cls_logits", "bbox_regression"]
    images = sorted(photos.glob("*.png"))
    _assert_same_detections(_predictions(PredictConfig(checkpoint=str(path), source="."), images, None),
                            _predictions(PredictConfig(checkpoint=result["out"], source=".", backend="onnx"), images, None))


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path):
    path, _ = checkpoint
    result = export_checkpoint(ExportConfig(checkpoint=str(path), format="torchscript", out=str(tmp_path / "m.pt")))
    assert result["max_difference"] < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still shipped
        traced = torch.jit.load(result["out"])
    model = build_model(ModelConfig(input_width=160, input_height=128))
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    images = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        expected = model.eval()(images)
        cls_logits, bbox_regression = traced(images)
    assert torch.allclose(cls_logits, expected["cls_logits"], atol=1e-5)
    assert torch.allclose(bbox_regression, expected["bbox_regression"], atol=1e-5)


def test_nothing_is_written_when_the_export_does_not_match(checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setattr("detlab.export.PARITY_TOLERANCE", -1.0)  # any difference (even 0) fails the check
    with pytest.raises(ExportError, match="differs from PyTorch.*nothing written"):
        export_checkpoint(ExportConfig(checkpoint=str(path), out=str(tmp_path / "m.onnx")))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_then_predict_backend_onnx_gives_pytorchs_json(checkpoint, tmp_path):
    path, photos = checkpoint
    proc = subprocess.run([sys.executable, "scripts/export.py", f"checkpoint={path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = path.with_suffix(".onnx")  # the default: beside the checkpoint
    assert json.loads(proc.stdout.strip().splitlines()[-1])["out"] == str(exported) and exported.is_file()
    outputs = {}
    for backend, model in (("torch", path), ("onnx", exported)):
        proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={model}", f"backend={backend}",
                               f"source={photos}", f"out={tmp_path / backend}", "eval.score_threshold=0.2"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[backend] = json.loads((tmp_path / backend / "predictions.json").read_text())
    assert sum(len(v) for v in outputs["torch"].values()) > 0
    def as_tensors(detections):
        return (torch.tensor([d["box"] for d in detections]).reshape(-1, 4),
                torch.tensor([d["score"] for d in detections]))

    assert outputs["onnx"].keys() == outputs["torch"].keys()
    _assert_same_detections([as_tensors(v) for v in outputs["torch"].values()],
                            [as_tensors(v) for v in outputs["onnx"].values()], atol=0.011)  # JSON: 2 decimals
    assert sorted(p.name for p in (tmp_path / "onnx" / "images").iterdir()) == sorted(
        p.with_suffix(".jpg").name for p in photos.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["format=tflite"], "format='tflite': expected one of onnx, torchscript"),
    (["input_size=[160]"], "input_size=[160]: expected null or [W, H]"),
    (["opset=9"], "opset=9: expected 13 to 20"),
])
def test_bad_export_arguments_are_one_line(checkpoint, tmp_path, args, message):
    path, _ = checkpoint
    proc = subprocess.run([sys.executable, "scripts/export.py", f"checkpoint={path}", f"out={tmp_path / 'm.onnx'}",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_wrong_files_for_the_backend_fail_clearly(checkpoint, tmp_path):
    path, photos = checkpoint
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"not a model")
    with pytest.raises(PredictError, match="backend=onnx takes a .onnx file"):
        load_predictor(PredictConfig(checkpoint=str(path), source=".", backend="onnx"))
    with pytest.raises(PredictError, match="an ONNX export; add backend=onnx"):
        load_predictor(PredictConfig(checkpoint=str(not_onnx), source="."))
    with pytest.raises(OnnxModelError, match="not an ONNX model ONNX Runtime can read"):
        load_exported(not_onnx)
    with pytest.raises(PredictError, match="backend='tflite': expected one of torch, onnx"):
        load_predictor(PredictConfig(checkpoint=str(path), source=".", backend="tflite"))
    # an ONNX file from elsewhere: no detlab config inside
    foreign = tmp_path / "foreign.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's notice
        torch.onnx.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),), str(foreign), dynamo=False)
    proc = subprocess.run([sys.executable, "predict.py", f"checkpoint={foreign}", "backend=onnx", f"source={photos}",
                           f"out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "without detlab's config" in proc.stderr
    assert not (tmp_path / "out").exists()
