"""Data-loading figures: ``python scripts/bench_loader.py [--batches 10] [--workers 0 1 2]``.

Prints: the generation time of the default synthetic dataset (1,000 images, 320x256, into a fresh
temporary folder), the per-sample cost of decoding and of the training transforms, the crop
sampler against torchvision's RandomIoUCrop, and DataLoader throughput (augmented training samples
at the model input size, images/s) for the synthetic default and the real WIDER FACE JPEGs with
0, 1 and 2 workers, as a share of a training step; then the same with the decoded-image cache
(``dataset.cache=ram``, warmed by one pass, 0 workers: a later epoch of a run; ``--cache-max-side``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from detlab.config import Config, SyntheticConfig
from detlab.data import build_datasets, build_loader, ensure_synthetic_dataset
from detlab.data.cache import DecodedImageCache
from detlab.data.transforms import RandomFaceCrop
from detlab.data.wider import read_image_rgb
from detlab.errors import report_user_errors
from detlab.paths import widerface_root

REPO = Path(__file__).resolve().parents[1]


def time_generation(root: Path) -> float:
    start = time.perf_counter()
    ensure_synthetic_dataset(root, SyntheticConfig())
    return time.perf_counter() - start


def per_sample_costs(dataset, n: int) -> tuple[float, float]:
    """Mean ms per sample of cv2 decode and of decode + transforms, in this process."""
    torch.manual_seed(0)
    start = time.perf_counter()
    for i in range(n):
        read_image_rgb(dataset.images_dir / dataset.records[i].path)
    decode = (time.perf_counter() - start) / n * 1e3
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    total = (time.perf_counter() - start) / n * 1e3
    return decode, total


def crop_sampler_costs(dataset, n: int, canvas: tuple[int, int]) -> tuple[float, float]:
    """ms per call of the crop parameter sampler: RandomIoUCrop vs RandomFaceCrop (boxes only;
    the image size is taken as ``canvas`` (H, W), enlarged to hold the boxes, not decoded)."""
    samples = []
    for record in dataset.records[:n]:
        height = int(max(record.boxes[:, 3].max(initial=0), canvas[0]))
        width = int(max(record.boxes[:, 2].max(initial=0), canvas[1]))
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(record.boxes), format="XYXY", canvas_size=(height, width))
        samples.append([tv_tensors.Image(torch.empty(3, height, width, dtype=torch.uint8)), boxes])
    out = []
    for crop in (v2.RandomIoUCrop(), RandomFaceCrop()):
        torch.manual_seed(0)
        start = time.perf_counter()
        for flat in samples:
            crop.make_params(flat)
        out.append((time.perf_counter() - start) / len(samples) * 1e3)
    return out[0], out[1]


def loader_throughput(dataset, workers: int, batches: int, batch_size: int) -> tuple[float, float]:
    """(images/s over ``batches`` batches after the first, seconds to the first batch)."""
    loader = build_loader(dataset, batch_size, shuffle=True, num_workers=workers, seed=0, drop_last=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        batch, _ = next(iterator)
        images += batch.shape[0]
    elapsed = time.perf_counter() - start
    del iterator, loader
    return images / elapsed, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--widerface", type=Path, default=widerface_root(),
                        help="WIDER FACE root (default: <paths.data_dir>/widerface; DETLAB_DATA sets paths.data_dir)")
    parser.add_argument("--cache-max-side", type=int, default=1024, help="dataset.cache_max_side for the cached rows")
    parser.add_argument("--step-seconds", type=float, default=0.5, help="training step time to compare with")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads of this process (workers always use 1). On a shared 2-core "
                             "machine 2 threads made a 320x256 sample 10-40x slower (thread barriers stall)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.batches} timed batches after the first")
    with tempfile.TemporaryDirectory() as tmp:
        seconds = time_generation(Path(tmp))
        print(f"synthetic generation ({SyntheticConfig().num_images} images, 320x256, seed 0): {seconds:.1f} s")

        datasets = []
        cfg = Config()
        cfg.dataset.root, cfg.dataset.cache = tmp, "none"
        datasets.append(("synthetic", build_datasets(cfg)[0], (256, 320)))
        if (args.widerface / "WIDER_val").is_dir():
            cfg = Config()
            cfg.dataset.name, cfg.dataset.root = "widerface", str(args.widerface)
            cfg.dataset.split.mode, cfg.dataset.split.source = "random", "val"
            cfg.dataset.cache = "none"
            datasets.append(("widerface", build_datasets(cfg)[0], (768, 1024)))
        else:
            print(f"WIDER FACE not found at {args.widerface}: real-data figures skipped")

        for name, dataset, canvas in datasets:
            decode, total = per_sample_costs(dataset, 32)
            iou_crop, face_crop = crop_sampler_costs(dataset, 200, canvas)
            print(f"{name}: per sample (1 process) decode {decode:.1f} ms, decode + train transforms {total:.1f} ms; "
                  f"crop sampler RandomIoUCrop {iou_crop:.2f} ms vs RandomFaceCrop {face_crop:.2f} ms")

        print(f"\n{'dataset':<10} {'workers':>7} {'images/s':>9} {'ms/batch':>9} {'of a ' + str(args.step_seconds) + ' s step':>14}"
              f" {'first batch s':>14}")
        for name, dataset, _ in datasets:
            for workers in args.workers:
                rate, first = loader_throughput(dataset, workers, args.batches, args.batch_size)
                per_batch = args.batch_size / rate
                print(f"{name:<10} {workers:>7} {rate:>9.0f} {per_batch * 1e3:>9.0f} "
                      f"{100 * per_batch / args.step_seconds:>13.0f}% {first:>14.2f}")
        print(f"\nwith dataset.cache=ram (cache_max_side {args.cache_max_side}), warmed, 0 workers:")
        for name, dataset, _ in datasets:
            dataset.cache = DecodedImageCache("ram", args.cache_max_side, None, read_image_rgb)
            for record in dataset.records:  # one pass: the figures are those of a later epoch
                dataset.cache.get(dataset.images_dir / record.path)
            rate, first = loader_throughput(dataset, 0, args.batches, args.batch_size)
            per_batch = args.batch_size / rate
            print(f"{name + ' ram':<10} {0:>7} {rate:>9.0f} {per_batch * 1e3:>9.0f} "
                  f"{100 * per_batch / args.step_seconds:>13.0f}% {first:>14.2f}")
    print("\nWith workers the loading overlaps the step (the share is the load it must hide); with 0 it adds.")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
