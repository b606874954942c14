"""Training-step time in float32 against bfloat16 autocast (and torch.compile) on the CPU.

    python scripts/bench_precision.py                        # ssd_slim and ssd_mobilenet_v2, batch 32, 320x256
    python scripts/bench_precision.py --models ssd_slim --compile --threads 2

One step = the training loop's ``train_step`` (matching, forward, multibox loss, backward, AdamW) on
a fixed batch with six faces per image. The variants run
in turn (A B A B ...) for ``--rounds`` rounds of ``--steps`` steps so a drifting machine hits every
variant alike; printed are the median milliseconds per step and the ratio to float32. With
``--compile`` the compile time (first compiled step) is printed apart, with the number of steps it
takes to pay for itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from detlab.config import Config, ModelConfig, OptimConfig
from detlab.engine.step import build_training
from detlab.errors import report_user_errors


def make_step(name: str, bf16: bool, compiled: bool, batch: int, width: int, height: int):
    torch.manual_seed(0)
    cfg = Config(model=replace(ModelConfig(name=name, input_width=width, input_height=height), match_iou=0.35),
                 optim=OptimConfig(name="adamw", lr=1e-3))
    cfg.train.cpu_bf16 = bf16
    parts = build_training(cfg, torch.device("cpu"), total_steps=10_000, steps_per_epoch=100)
    parts.model.train()
    if compiled:
        parts.model = torch.compile(parts.model)
    images = torch.randn(batch, 3, height, width)
    generator = torch.Generator().manual_seed(0)
    faces = []
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=generator) * torch.tensor([width - 40.0, height - 40.0])
        wh = 8 + torch.rand(6, 1, generator=generator) * 30
        faces.append(torch.cat([xy, xy + wh], dim=1))
    counter = iter(range(10**9))

    def step() -> None:
        parts.step(images, faces, next(counter))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ssd_slim", "ssd_mobilenet_v2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=[320, 256], metavar=("W", "H"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        variants = {"fp32": (False, False), "bf16": (True, False)}
        if args.compile:
            variants.update({"fp32+compile": (False, True), "bf16+compile": (True, True)})
        steps, compile_s = {}, {}
        for label, (bf16, compiled) in variants.items():
            steps[label] = make_step(name, bf16, compiled, args.batch, *args.size)
            t0 = time.perf_counter()
            steps[label]()  # warm-up (compiles when compiled)
            compile_s[label] = time.perf_counter() - t0
        times: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(args.rounds):
            for label, step in steps.items():
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    times[label].append(time.perf_counter() - t0)
        base = statistics.median(times["fp32"])
        print(f"{name}, batch {args.batch}, {args.size[0]}x{args.size[1]}, {args.threads} threads, "
              f"{args.rounds}x{args.steps} steps each")
        for label, values in times.items():
            median = statistics.median(values)
            line = f"  {label:13s} {1e3 * median:7.0f} ms/step (min {1e3 * min(values):.0f}, max {1e3 * max(values):.0f})" \
                   f"  x{median / base:.2f} of fp32"
            if "compile" in label:
                plain = statistics.median(times[label.replace("+compile", "")])
                saved = plain - median
                extra = compile_s[label] - median
                payback = f"pays back after {extra / saved:.0f} steps" if saved > 0 else "never pays back"
                line += f"; compile {compile_s[label]:.1f} s, {payback}"
            print(line)


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
