"""Inference speed per image: PyTorch eager against ONNX Runtime, at 1 and 2 threads, batch of one.

    pip install -e ".[export]"
    python scripts/bench_inference.py --checkpoint outputs/<slim run>/checkpoints/last.pt \\
        --checkpoint outputs/<ssdlite run>/checkpoints/last.pt --sizes 320x256 640x512 [--images 60]

For every checkpoint, input size and thread count, both backends predict the same images through the
package's one prediction path (``detlab.prediction.predict_image``: resize and normalise, the network,
``SSD.postprocess`` with the checkpoint's ``eval`` settings), interleaved image by image so both see
the same machine load; ONNX Runtime runs the checkpoint exported at that fixed size by
``detlab.export`` (parity-checked on export) and run by ``detlab.onnx_runtime``. The backends alternate in blocks of 12 images, the
first two of each block untimed: image by image, each backend's idle thread pool (ONNX Runtime's
spinning threads, OpenMP's) would slow the other down. Printed: the median milliseconds per image, all of it
and the network alone, and the ONNX Runtime speed-up. The images are real WIDER val images when
``<paths.data_dir>/widerface`` is there (``DETLAB_DATA``) (``--images`` of them, the decode not timed), else the synthetic set's.
``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detlab.errors import UserError, report_user_errors
from detlab.runtime.fileio import atomic_write_text


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--sizes {text!r}: expected WxH, e.g. 320x256") from None
    return width, height


def bench_images(limit: int) -> tuple[list, str]:
    """RGB arrays of real WIDER val images (or the synthetic val set when WIDER is absent)."""
    from detlab.data.wider import read_image_rgb
    from detlab.paths import widerface_root

    root = widerface_root() / "WIDER_val" / "images"
    if root.is_dir():
        paths = sorted(root.glob("*/*.jpg"))
        step = max(len(paths) // limit, 1)
        return [read_image_rgb(p) for p in paths[::step][:limit]], f"{limit} WIDER val images"
    from detlab.config import Config
    from detlab.data import build_datasets

    _, val = build_datasets(Config())
    return [read_image_rgb(val.images_dir / r.path) for r in val.records[:limit]], f"{limit} synthetic val images"


def time_pair(checkpoint: Path, size: tuple[int, int], threads: int, images: list, warmup: int,
              block: int = 12) -> dict:
    from detlab.trained import load_trained
    from detlab.config import ExportConfig
    from detlab.export import export_checkpoint
    from detlab.onnx_runtime import OnnxModelsBySize, load_exported
    from detlab.prediction import ModelsBySize, OriginalSizeImages, predict_image

    torch.set_num_threads(threads)
    cfg, state = load_trained(checkpoint)
    device = torch.device("cpu")
    settings = cfg.eval
    with tempfile.TemporaryDirectory() as folder:
        onnx_file = Path(folder) / "model.onnx"
        export_checkpoint(ExportConfig(checkpoint=str(checkpoint), out=str(onnx_file), input_size=list(size)))
        _, session = load_exported(onnx_file, threads=threads)
    backends = {"pytorch": ModelsBySize(cfg.model, state["model"], device),
                "onnxruntime": OnnxModelsBySize(onnx_file, session, cfg.model)}
    prepare = OriginalSizeImages([], Path("."), size=size).prepare
    totals: dict[str, list[float]] = {name: [] for name in backends}
    networks: dict[str, list[float]] = {name: [] for name in backends}
    for start in range(0, len(images), block):
        for name, models in backends.items():  # a block of images each, so idle thread pools settle
            model = models(*size)
            forward = model.forward
            spent: list[float] = []

            def timed_forward(x, forward=forward, spent=spent):
                started = time.perf_counter()
                out = forward(x)
                spent.append(time.perf_counter() - started)
                return out

            model.forward = timed_forward  # the network's share, inside the same call
            for index, rgb in enumerate(images[start:start + block]):
                started = time.perf_counter()
                with torch.inference_mode():
                    predict_image(models, *prepare(rgb), device, settings)
                elapsed = time.perf_counter() - started
                if index >= warmup:  # the first images of a block wake the backend's threads
                    totals[name].append(elapsed * 1000)
                    networks[name].append(spent[-1] * 1000)
            del model.forward
    row = {"model": cfg.model.name, "size": f"{size[0]}x{size[1]}", "threads": threads}
    for name in backends:
        row[f"{name}_ms"] = round(statistics.median(totals[name]), 2)
        row[f"{name}_network_ms"] = round(statistics.median(networks[name]), 2)
    row["speedup"] = round(row["pytorch_ms"] / row["onnxruntime_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, action="append", required=True, help="repeat for several models")
    parser.add_argument("--sizes", nargs="+", default=["320x256", "640x512"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=2, help="untimed images at the start of each block")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes]
    images, source = bench_images(args.images)
    print(f"{source}, batch 1, median ms per image (resize + network + post-processing; network alone)")
    print(f"{'model':18} {'size':>8} {'thr':>3} | {'PyTorch':>14} | {'ONNX Runtime':>14} | speed-up")
    rows = []
    for checkpoint in args.checkpoint:
        for size in sizes:
            for threads in args.threads:
                row = time_pair(checkpoint, size, threads, images, args.warmup)
                rows.append(row)
                print(f"{row['model']:18} {row['size']:>8} {threads:>3} | {row['pytorch_ms']:6.1f} ({row['pytorch_network_ms']:5.1f})"
                      f" | {row['onnxruntime_ms']:6.1f} ({row['onnxruntime_network_ms']:5.1f}) | {row['speedup']:.2f}x",
                      flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"images": source, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    with report_user_errors():
        main()
