"""Training-step time of detlab's ``model=ssdlite`` against torchvision's own SSDlite320.

One step = forward + matching + loss + backward + SGD step, batch 32 at 320x320, two classes, the
same random images and faces for both models. Measured side by side (interleaved, so both see the
same machine load): warm-up steps, then the median of N. Also prints ``ssd_slim``'s step at
320x256.

    python scripts/bench_ssdlite.py [--iters 5] [--warmup 1] [--batch 32] [--device auto] [--with-nchw]

detlab runs its convolutions channels-last by default (``model.channels_last``); ``--with-nchw``
also times it in torchvision's NCHW layout, to separate that from the rest of the step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torchvision

from detlab.config import LossConfig, ModelConfig
from detlab.errors import report_user_errors
from detlab.loss import MultiBoxLoss
from detlab.model import build_model


def random_faces(batch: int, width: int, height: int, generator: torch.Generator) -> list[torch.Tensor]:
    faces = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (1,), generator=generator))
        wh = 8 + torch.rand(n, 2, generator=generator) * 80
        xy = torch.rand(n, 2, generator=generator) * (torch.tensor([width, height]) - wh)
        faces.append(torch.cat((xy, xy + wh), dim=1))
    return faces


def detlab_step(model, images, faces, device) -> Callable[[], None]:
    # The criterion matches the faces to the anchors itself (as in training), so matching is timed too.
    criterion = MultiBoxLoss(LossConfig(), model.anchors, model.box_coder, model.cfg.match_iou)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    faces = [f.to(device) for f in faces]

    def step() -> None:
        out = model(images)
        loss = criterion(out, faces, step=0).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def torchvision_step(model, images, faces, device) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    image_list = list(images)
    targets = [{"boxes": f.to(device), "labels": torch.ones(len(f), dtype=torch.int64, device=device)} for f in faces]

    def step() -> None:
        losses = model(image_list, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(steps: dict[str, Callable[[], None]], warmup: int, iters: int, device: torch.device) -> dict[str, float]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):  # interleaved: each round runs every model once
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-slim", action="store_true", help="skip the ssd_slim figure")
    parser.add_argument("--with-nchw", action="store_true",
                        help="also time detlab ssdlite with model.channels_last=false (torchvision's memory layout)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    size = 320
    images = torch.rand(args.batch, 3, size, size, generator=generator).to(device)
    faces = random_faces(args.batch, size, size, generator)
    ours = build_model(ModelConfig(name="ssdlite", input_width=size, input_height=size)).to(device).train()
    theirs = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        num_classes=2, weights=None, weights_backbone=None
    ).to(device).train()
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} warmup={args.warmup} iters={args.iters}")
    print(f"detlab ssdlite: {n_ours:,} parameters, {ours.num_anchors} anchors; torchvision ssdlite320: {n_theirs:,} parameters")
    steps = {
        "detlab ssdlite 320x320": detlab_step(ours, images, faces, device),
        "torchvision ssdlite320_mobilenet_v3_large": torchvision_step(theirs, images, faces, device),
    }
    if args.with_nchw:
        nchw = build_model(ModelConfig(name="ssdlite", input_width=size, input_height=size, channels_last=False))
        steps["detlab ssdlite 320x320 channels_last=false"] = detlab_step(nchw.to(device).train(), images, faces, device)
    medians = measure(steps, args.warmup, args.iters, device)
    for name, seconds in medians.items():
        print(f"{name:45s} {seconds * 1000:9.1f} ms/step (median)")
    names = list(medians)
    t_ours, t_theirs = medians[names[0]], medians[names[1]]
    verdict = "not slower" if t_ours <= t_theirs else "SLOWER"
    print(f"ratio detlab / torchvision = {t_ours / t_theirs:.3f} ({verdict})")
    if args.with_nchw:
        print(f"ratio detlab (channels_last=false) / torchvision = {medians[names[2]] / t_theirs:.3f}")
    del ours, theirs, steps

    if not args.no_slim:
        slim = build_model(ModelConfig(name="ssd_slim")).to(device).train()
        slim_images = torch.rand(args.batch, 3, 256, 320, generator=generator).to(device)
        slim_faces = random_faces(args.batch, 320, 256, generator)
        seconds = measure({"slim": detlab_step(slim, slim_images, slim_faces, device)}, args.warmup, args.iters, device)["slim"]
        n_slim = sum(p.numel() for p in slim.parameters())
        print(f"{'detlab ssd_slim 320x256':45s} {seconds * 1000:9.1f} ms/step (median; {n_slim:,} parameters, {slim.num_anchors} anchors)")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
