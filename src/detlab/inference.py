"""Run a trained checkpoint on your own images: the library behind ``predict.py``.

``predict_images(run)`` reads an image or a folder of images, predicts through ``detlab.predict``
(the path validation and ``evaluate.py`` take) at the checkpoint's test size (``eval.input_size``),
and writes, into ``run.out``: each image with its boxes and scores drawn, ``predictions.json`` (per
image, the boxes scoring at least ``eval.score_threshold``), and with ``save_wider`` the WIDER FACE
submission layout. Settings are the checkpoint's; ``eval.*`` keys on the command line override them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from detlab.config import EvalConfig, test_input_size
from detlab.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class PredictConfig:
    """Schema of ``configs/predict.yaml``."""

    checkpoint: str = MISSING
    source: str = MISSING  # an image, or a folder of images (searched recursively)
    out: Optional[str] = None  # null: Hydra's output directory
    # The training config's ``eval`` group: the keys set on the command line override the checkpoint's.
    eval: EvalConfig = field(default_factory=EvalConfig)
    draw: bool = True  # write each image with its boxes drawn
    save_wider: bool = False  # also write the WIDER FACE submission layout into <out>/wider
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # CUDA only


ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


class PredictError(UserError, ValueError):
    """A bad predict.py argument or source; the message says which and why."""


def find_images(source: Path | str) -> list[Path]:
    """The image, or the images under the folder (recursively, sorted); a clear error otherwise."""
    source = Path(source).expanduser()
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise PredictError(f"source={source}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        return [source]
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PredictError(f"source={source}: no image ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return images
    raise PredictError(f"source={source}: no such file or folder")


def predict_images(run: PredictConfig, eval_keys: Sequence[str] = (), out_dir: Optional[Path] = None) -> dict[str, Any]:
    """Predict every image of ``run.source``; returns ``{"out", "images", "faces", "settings"}``."""
    import cv2
    import numpy as np

    from detlab.data.wider import read_image_rgb
    from detlab.engine.checkpoint import load_trained
    from detlab.engine.device import select_device
    from detlab.fileio import atomic_write_bytes, write_json
    from detlab.predict import OriginalSizeImages, predict_original_size

    if run.device not in ("auto", "cpu", "cuda"):
        raise PredictError(f"device={run.device!r}: expected auto, cpu or cuda")
    images = find_images(run.source)
    from detlab.evaluation import with_eval_overrides

    trained, checkpoint = load_trained(run.checkpoint)
    settings = with_eval_overrides(trained, run.eval, eval_keys).eval  # validated, as evaluate.py's
    size = test_input_size(settings.input_size)
    device = select_device(run.device)
    records = [SimpleNamespace(path=str(p.resolve())) for p in images]
    dataset = OriginalSizeImages(
        records, Path("/"), long_side=size if isinstance(size, int) else None,
        size=(trained.model.input_width, trained.model.input_height) if size is None else (size if isinstance(size, tuple) else None))
    predictions = predict_original_size(trained.model, checkpoint["model"], dataset, device, settings,
                                        amp=run.amp and device.type == "cuda", progress=True)

    out = Path(out_dir or run.out or ".")
    root = Path(run.source).expanduser().resolve()
    root = root.parent if root.is_file() else root
    per_image: dict[str, list[dict[str, Any]]] = {}
    submission: dict[str, np.ndarray] = {}
    for index, boxes, scores in predictions:
        name = images[index].resolve().relative_to(root).as_posix()
        keep = scores >= settings.score_threshold
        per_image[name] = [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 5)}
                           for box, score in zip(boxes[keep].tolist(), scores[keep].tolist())]
        if run.save_wider:
            from detlab.wider_eval import image_key, xyxy_to_submission

            # WIDER keeps images in <event>/ folders: the image's own folder is its event
            image = images[index]
            submission[image_key(f"{image.parent.name}/{image.name}")] = xyxy_to_submission(boxes.numpy(), scores.numpy())
        if run.draw:
            drawn = draw_boxes(read_image_rgb(images[index]), boxes[keep].numpy(), scores[keep].numpy())
            ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            target = out / "images" / Path(name).with_suffix(".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, encoded.tobytes())
    write_json(out / "predictions.json", per_image)
    if run.save_wider:
        from detlab.wider_eval import save_predictions

        save_predictions(submission, out / "wider")
    return {"out": str(out), "images": len(per_image), "faces": sum(len(v) for v in per_image.values()),
            "settings": {"input_size": settings.input_size if settings.input_size is not None
                         else [trained.model.input_width, trained.model.input_height],
                         **{k: getattr(settings, k) for k in ("score_threshold", "score_floor", "nms_iou",
                                                              "max_detections")}}}


def draw_boxes(rgb: Any, boxes: Any, scores: Any) -> Any:
    """A copy of the RGB image with each box and its score drawn (line width from the image size)."""
    import cv2

    canvas = rgb.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for (x1, y1, x2, y2), score in zip(boxes.tolist(), scores.tolist()):
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(canvas, p1, p2, (0, 255, 0), thickness)
        cv2.putText(canvas, f"{score:.2f}", (p1[0], max(p1[1] - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35 * thickness + 0.1, (0, 255, 0), max(1, thickness - 1), cv2.LINE_AA)
    return canvas


def to_predict_config(raw: Any) -> PredictConfig:
    """Hydra's composed ``predict.yaml`` as a typed ``PredictConfig`` (a wrong type: one clear error)."""
    from detlab.evaluation import typed_entry_config

    return typed_entry_config(raw, PredictConfig, PredictError)
