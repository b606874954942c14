"""Run a trained checkpoint on your own images or a video: the library behind ``predict.py``.

``predict_images(run)`` reads an image, a folder of images or a video file, predicts through
``detlab.prediction`` (the path validation and ``evaluate.py`` take) at the checkpoint's test size
(``eval.input_size``), and writes, into ``run.out``: each image with its boxes and scores drawn (a
video: ``<name>.mp4`` with every frame drawn), ``predictions.json`` (per image, or per frame as
``<video name>/<frame index>``, the boxes scoring at least ``eval.score_threshold``), and with
``save_wider`` the WIDER FACE submission layout. Settings are the checkpoint's; ``eval.*`` keys on the
command line override them. ``backend=onnx`` runs an ``export.py`` ONNX file in ONNX Runtime instead of
PyTorch (``detlab.onnx_runtime``); the post-processing is the same code.

``Detector`` is the same from Python: ``Detector.load(checkpoint or .onnx file)`` then
``.predict(image)`` -> ``Detections(boxes, scores)``, the boxes ``predict.py`` writes for that image.
``predict_images`` predicts through a ``Detector``, so there is one path from a file to its boxes.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Optional, Sequence

from detlab.config import Config, EvalConfig, PredictConfig, test_input_size, typed_entry_config
from detlab.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

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


class Detections(NamedTuple):
    """One image's faces: ``boxes`` ``[K, 4]`` float32 ``x1, y1, x2, y2`` in the image's own pixels and
    ``scores`` ``[K]`` float32, highest first; those scoring at least ``eval.score_threshold`` (what
    ``predict.py`` draws and writes). ``boxes, scores = detections`` unpacks them."""

    boxes: "np.ndarray"
    scores: "np.ndarray"


ImageInput = Any  # a path (str or os.PathLike), an RGB HxWx3 uint8 numpy array, or a PIL image


class Detector:
    """A trained face detector for your own images, from Python::

        from detlab import Detector

        detector = Detector.load("outputs/2026-11-23/20-00-00/checkpoints/best.pt")  # or export.py's .onnx
        boxes, scores = detector.predict("photo.jpg")  # [K, 4] xyxy in the photo's pixels, [K]

    ``predict`` gives the boxes ``predict.py`` writes for the same image: the same loading
    (``load_predictor``), test size (``eval.input_size``), prediction path (``detlab.prediction``) and
    threshold. (Not to be confused with ``detlab.diagnosis.Detector``, a failure-pattern detector.)
    """

    def __init__(self, models: Any, settings: EvalConfig, device: "torch.device", config: Config,
                 backend: str = "torch", amp: bool = False, checkpoint: str = "") -> None:
        from detlab.prediction import OriginalSizeImages

        self.models, self.settings, self.device, self.config = models, settings, device, config
        self.backend, self.amp, self.checkpoint = backend, amp, checkpoint
        size = test_input_size(settings.input_size)
        self.input_size = (config.model.input_width, config.model.input_height) if size is None else size
        self._prepare = OriginalSizeImages([], Path("/"), long_side=self.input_size if isinstance(self.input_size, int)
                                           else None,
                                           size=self.input_size if isinstance(self.input_size, tuple) else None).prepare

    @classmethod
    def load(cls, checkpoint: Path | str, device: str = "auto", amp: bool = False, **eval_settings: Any) -> "Detector":
        """A train.py checkpoint (``.pt``, run in PyTorch on ``device``: auto, cpu or cuda) or an ONNX file
        written by ``scripts/export.py`` (``.onnx``, run in ONNX Runtime on the CPU). The settings are the
        checkpoint's ``eval`` group; keyword arguments override them as ``eval.KEY=...`` does on
        predict.py's command line, e.g. ``score_threshold=0.3``, ``input_size=960``, ``nms_iou=0.5``."""
        known = {f.name for f in fields(EvalConfig)}
        unknown = sorted(set(eval_settings) - known)
        if unknown:
            raise PredictError(f"Detector.load: unknown setting(s) {', '.join(unknown)}; expected eval keys: "
                               f"{', '.join(sorted(known))}")
        path = Path(checkpoint).expanduser()
        backend = "onnx" if path.suffix.lower() == ".onnx" else "torch"
        run = PredictConfig(checkpoint=str(path), source="", eval=EvalConfig(**eval_settings), backend=backend,
                            device=device, amp=amp)
        return cls.from_config(run, list(eval_settings))

    @classmethod
    def from_config(cls, run: PredictConfig, eval_keys: Sequence[str] = ()) -> "Detector":
        """The detector of a predict.py config (``run.source`` is not read): ``run.eval``'s ``eval_keys``
        override the checkpoint's settings."""
        models, settings, device, trained = load_predictor(run, eval_keys)
        return cls(models, settings, device, trained, backend=run.backend, amp=run.amp and device.type == "cuda",
                   checkpoint=str(run.checkpoint))

    def predict(self, image: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        """The faces of an image (a path, an RGB ``HxWx3`` uint8 array, a PIL image), scoring at least
        ``eval.score_threshold``, boxes in the image's pixels; a list of images gives a list."""
        if isinstance(image, (list, tuple)):
            return [self.predict(one) for one in image]
        boxes, scores = self.detect(to_rgb(image))
        keep = scores >= self.settings.score_threshold
        return Detections(boxes[keep].numpy(), scores[keep].numpy())

    def detect(self, rgb: "np.ndarray") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Every detection of an RGB ``HxWx3`` uint8 image above ``eval.score_floor`` (what AP and the
        WIDER layout take): ``(boxes [K, 4] in its pixels, scores [K])``, CPU tensors."""
        from detlab.prediction import predict_image

        return predict_image(self.models, *self._prepare(rgb), self.device, self.settings, self.amp)

    def __repr__(self) -> str:
        size = self.input_size
        size = f"{size[0]}x{size[1]}" if isinstance(size, tuple) else size
        return (f"Detector({self.checkpoint!r}, backend={self.backend}, device={self.device}, input_size={size}, "
                f"score_threshold={self.settings.score_threshold})")


def to_rgb(image: ImageInput) -> "np.ndarray":
    """An image as a contiguous RGB ``HxWx3`` uint8 array: a path is read as predict.py reads it (EXIF
    orientation applied), an array is taken as RGB, a PIL image is converted to RGB."""
    import numpy as np

    if isinstance(image, (str, os.PathLike)):
        from detlab.data.wider import read_image_rgb

        path = Path(image).expanduser()
        if path.is_dir():
            raise PredictError(f"{path}: a folder; Detector.predict takes one image (or a list of them); "
                               f"predict.py source={path} predicts a whole folder")
        return read_image_rgb(path)
    pil = sys.modules.get("PIL.Image")  # a PIL image can only come from a program that imported PIL
    if pil is not None and isinstance(image, pil.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise PredictError(f"an image array must be RGB, HxWx3, uint8; got shape {image.shape}, "
                               f"dtype {image.dtype}")
        return np.require(image, requirements=("C", "W"))  # a copy only when it is a view or read-only
    raise PredictError(f"cannot predict on a {type(image).__name__}: expected a path, an RGB HxWx3 uint8 numpy "
                       f"array or a PIL image")


def predict_images(run: PredictConfig, eval_keys: Sequence[str] = (), out_dir: Optional[Path] = None) -> dict[str, Any]:
    """Predict every image (or video frame) of ``run.source``; returns ``{"out", "images", "faces", "settings"}``."""
    import cv2

    from detlab.data.wider import read_image_rgb
    from detlab.runtime.fileio import atomic_path, write_jpeg, write_json

    video = is_video(run.source)
    if video and run.save_wider:
        raise PredictError("save_wider=true: the WIDER submission layout is for images, not a video source")
    images = [] if video else find_images(run.source)
    frames = VideoFrames(Path(run.source).expanduser()) if video else None
    detector = Detector.from_config(run, eval_keys)
    settings = detector.settings

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
            boxes, scores = detector.detect(rgb)
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
                         else list(detector.input_size),
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
