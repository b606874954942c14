"""Run a trained checkpoint on your own images or a video: the library behind ``predict.py``.

``predict_images(run)`` reads an image, a folder of images or a video file, predicts through
``detlab.prediction`` (the path validation and ``evaluate.py`` take) at the checkpoint's test size
(``eval.input_size``), and writes, into ``run.out``: each image with its boxes and scores drawn (a
video: ``<name>.mp4`` with every frame drawn), ``predictions.json`` (per image, or per frame as
``<video name>/<frame index>``, the boxes scoring at least ``eval.score_threshold``), and with
``save_wider`` the WIDER FACE submission layout. Settings are the checkpoint's; ``eval.*`` keys on the
command line override them. ``backend=onnx`` runs an ``export.py`` ONNX file in ONNX Runtime instead of
PyTorch (``detlab.onnx_runtime``); the post-processing is the same code.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from detlab.config import EvalConfig, PredictConfig, test_input_size, typed_entry_config
from detlab.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
BACKENDS = ("torch", "onnx")


class PredictError(UserError, ValueError):
    """A bad predict.py argument or source; the message says which and why."""


def is_video(source: Path | str) -> bool:
    source = Path(source).expanduser()
    return source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES


def find_images(source: Path | str) -> list[Path]:
    """The image, or the images under the folder (recursively, sorted); a clear error otherwise."""
    source = Path(source).expanduser()
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise PredictError(f"source={source}: not an image or a video file (expected "
                               f"{', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
        return [source]
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PredictError(f"source={source}: no image ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return images
    raise PredictError(f"source={source}: no such file or folder")


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (C libraries write there directly)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class VideoFrames:
    """The frames of a video file as RGB arrays, read one at a time (``cv2.VideoCapture``)."""

    def __init__(self, path: Path) -> None:
        import cv2

        self.path = path
        with _native_stderr_silenced():  # FFmpeg prints its own lines ("moov atom not found") for a bad file
            self.capture = cv2.VideoCapture(str(path))
            ok, first = self.capture.read() if self.capture.isOpened() else (False, None)
        if not ok:
            self.capture.release()
            raise PredictError(f"source={path}: no frame can be read from this video (unreadable or empty)")
        self.first = first
        self.fps = float(self.capture.get(cv2.CAP_PROP_FPS)) or 25.0
        self.frame_count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # an estimate for some codecs

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        import cv2

        index, bgr = 0, self.first
        try:
            while bgr is not None:
                yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                ok, bgr = self.capture.read()
                bgr, index = (bgr if ok else None), index + 1
        finally:
            self.capture.release()


def load_predictor(run: PredictConfig, eval_keys: Sequence[str] = ()) -> tuple[Any, EvalConfig, Any, Any]:
    """``(models by input size, eval settings, device, training config)`` for ``run.backend``."""
    from detlab.runtime.device import select_device
    from detlab.evaluation import with_eval_overrides
    from detlab.prediction import ModelsBySize

    if run.backend not in BACKENDS:
        raise PredictError(f"backend={run.backend!r}: expected one of {', '.join(BACKENDS)}")
    if run.device not in ("auto", "cpu", "cuda"):
        raise PredictError(f"device={run.device!r}: expected auto, cpu or cuda")
    onnx_file = Path(run.checkpoint).suffix.lower() == ".onnx"
    if run.backend == "onnx":
        from detlab.onnx_runtime import OnnxModelsBySize, load_exported

        if run.device == "cuda":
            raise PredictError("device=cuda: backend=onnx runs on the CPU (ONNX Runtime); use backend=torch on a GPU")
        if not onnx_file:
            raise PredictError(f"checkpoint={run.checkpoint}: backend=onnx takes a .onnx file written by "
                               f"scripts/export.py format=onnx")
        trained, session = load_exported(run.checkpoint)
        device = select_device("cpu")
        models = OnnxModelsBySize(run.checkpoint, session, trained.model)
    else:
        from detlab.trained import load_trained

        if onnx_file:
            raise PredictError(f"checkpoint={run.checkpoint}: an ONNX export; add backend=onnx to run it")
        trained, checkpoint = load_trained(run.checkpoint)
        device = select_device(run.device)
        models = ModelsBySize(trained.model, checkpoint["model"], device)
    settings = with_eval_overrides(trained, run.eval, eval_keys).eval  # validated, as evaluate.py's
    return models, settings, device, trained


def predict_images(run: PredictConfig, eval_keys: Sequence[str] = (), out_dir: Optional[Path] = None) -> dict[str, Any]:
    """Predict every image (or video frame) of ``run.source``; returns ``{"out", "images", "faces", "settings"}``."""
    import cv2

    from detlab.data.wider import read_image_rgb
    from detlab.runtime.fileio import atomic_path, write_jpeg, write_json
    from detlab.prediction import OriginalSizeImages, predict_image

    video = is_video(run.source)
    if video and run.save_wider:
        raise PredictError("save_wider=true: the WIDER submission layout is for images, not a video source")
    images = [] if video else find_images(run.source)
    frames = VideoFrames(Path(run.source).expanduser()) if video else None
    models, settings, device, trained = load_predictor(run, eval_keys)
    size = test_input_size(settings.input_size)
    size = (trained.model.input_width, trained.model.input_height) if size is None else size
    prepare = OriginalSizeImages([], Path("/"), long_side=size if isinstance(size, int) else None,
                                 size=size if isinstance(size, tuple) else None).prepare
    amp = run.amp and device.type == "cuda"

    out = Path(out_dir or run.out or ".")
    root = Path(run.source).expanduser().resolve()
    root = root.parent if root.is_file() else root
    per_image: dict[str, list[dict[str, Any]]] = {}
    submission: dict[str, Any] = {}
    writer = None
    if frames is not None:
        items = ((f"{frames.path.name}/{index:06d}", rgb, None) for index, rgb in frames)
        total, unit = frames.frame_count, "frame"
    else:
        items = ((path.resolve().relative_to(root).as_posix(), None, path) for path in images)
        total, unit = len(images), "image"
    from tqdm.auto import tqdm

    with ExitStack() as stack:
        for name, rgb, path in tqdm(items, total=total, desc="predict", unit=unit, dynamic_ncols=True):
            rgb = read_image_rgb(path) if rgb is None else rgb
            boxes, scores = predict_image(models, *prepare(rgb), device, settings, amp)
            keep = scores >= settings.score_threshold
            per_image[name] = [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 5)}
                               for box, score in zip(boxes[keep].tolist(), scores[keep].tolist())]
            if run.save_wider:
                from detlab.wider_eval import image_key, xyxy_to_submission

                # WIDER keeps images in <event>/ folders: the image's own folder is its event
                submission[image_key(f"{path.parent.name}/{path.name}")] = xyxy_to_submission(boxes.numpy(),
                                                                                              scores.numpy())
            if not run.draw:
                continue
            drawn_rgb = draw_boxes(rgb, boxes[keep].numpy(), scores[keep].numpy())
            if frames is not None:
                drawn = cv2.cvtColor(drawn_rgb, cv2.COLOR_RGB2BGR)
                if writer is None:
                    target = out / Path(frames.path.name).with_suffix(".mp4")
                    tmp = stack.enter_context(atomic_path(target, suffix=".mp4"))
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), frames.fps,
                                             (drawn.shape[1], drawn.shape[0]))
                    stack.callback(writer.release)  # before atomic_path renames the file (LIFO)
                writer.write(drawn)
            else:
                write_jpeg(out / "images" / Path(name).with_suffix(".jpg"), drawn_rgb)
    write_json(out / "predictions.json", per_image)
    if run.save_wider:
        from detlab.wider_eval import save_predictions

        save_predictions(submission, out / "wider")
    return {"out": str(out), "images": len(per_image), "faces": sum(len(v) for v in per_image.values()),
            "source": "video" if video else "images", "backend": run.backend,
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
    return typed_entry_config(raw, PredictConfig, PredictError)
