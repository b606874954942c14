"""Where a training step's time goes: decode, augment, matching, forward, loss, backward, optimiser, logging.

    python scripts/profile_step.py                                   # the default run (synthetic, ssd_slim)
    python scripts/profile_step.py dataset=widerface dataset.root=../shared/widerface
    python scripts/profile_step.py --bf16 dataset.cache=ram          # any train.py override
    python scripts/profile_step.py --compile                         # torch.compile(model), compile time apart

Runs ``--steps`` real training steps of the config (its loader, augmentation, matching, criterion,
optimiser, diagnosis) with ``--threads`` torch threads and prints the median milliseconds of each part
and its share of the step. The decoded-image cache is warmed by ``--warm-epochs`` passes first when it
is on (``dataset.cache=ram|disk``), so the figures are those of a later epoch; ``--no-warm`` shows the
first. Data loading runs in the main process (``num_workers=0``), so its parts are timed directly:
decode is the image decoder (or cache), augment is the transform pipeline, collate the remainder.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from detlab.config import compose_config
from detlab.data import build_datasets, build_loader
from detlab.diagnosis import Diagnoser
from detlab.engine.optim import build_optimizer
from detlab.loss import MultiBoxLoss
from detlab.model import build_model
from detlab.model.matching import assign_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Timed:
    """Wraps a callable and adds its wall time to ``total`` (seconds)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.total = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward (CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time printed apart)")
    parser.add_argument("--warm-epochs", type=int, default=1)
    parser.add_argument("--no-warm", action="store_true")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. dataset=widerface")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config(CONFIGS, args.overrides)
    torch.manual_seed(0)
    train_set, _ = build_datasets(cfg)
    decode = train_set.cache.decode = Timed(train_set.cache.decode)
    augment = train_set.transform = Timed(train_set.transform)
    loader = build_loader(train_set, cfg.train.batch_size, shuffle=True, num_workers=0, seed=0, drop_last=True)
    if cfg.dataset.cache != "none" and not args.no_warm:
        for _ in range(args.warm_epochs):
            for index in range(len(train_set)):
                train_set.cache.get(train_set.images_dir / train_set.records[index].path)

    model = build_model(cfg.model)
    model.train()
    forward = model
    compile_s = 0.0
    criterion = MultiBoxLoss(cfg.loss)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    steps_per_epoch = len(loader)
    diagnoser = Diagnoser(cfg.diagnosis, steps_per_epoch * cfg.train.epochs, steps_per_epoch, 10, 100)
    if args.compile:
        forward = torch.compile(model)
        images, targets = next(iter(loader))
        t0 = time.perf_counter()
        with torch.autocast("cpu", enabled=args.bf16):
            out = forward(images)
        (out["cls_logits"].float().sum() + out["bbox_regression"].float().sum()).backward()
        compile_s = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)

    parts: dict[str, list[float]] = {k: [] for k in ("decode", "augment", "collate", "matching", "forward", "loss",
                                                    "backward", "optimiser", "logging")}
    step = 0
    batches = iter(loader)
    while step < args.steps:
        decode.total = augment.total = 0.0
        t0 = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        t1 = time.perf_counter()
        labels, box_targets = assign_targets(model.anchors, [t["boxes"] for t in targets], model.box_coder,
                                             cfg.model.match_iou, cfg.model.ignore_iou)
        t2 = time.perf_counter()
        with torch.autocast("cpu", enabled=args.bf16):
            out = forward(images)
        t3 = time.perf_counter()
        losses = criterion(out["cls_logits"].float(), out["bbox_regression"].float(), labels, box_targets)
        t4 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses["loss_total"].backward()
        t5 = time.perf_counter()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
        optimizer.step()
        t6 = time.perf_counter()
        signals = {"loss_cls": float(losses["loss_cls"]), "loss_box": float(losses["loss_box"]),
                   "loss_total": float(losses["loss_total"]), "lr": 0.01, "grad_norm": grad_norm,
                   "num_pos": float(losses["num_pos"])}
        diagnoser.observe_step(step, 1, signals)
        t7 = time.perf_counter()
        if step > 0:  # the first step pays one-off allocations
            load = t1 - t0
            parts["decode"].append(decode.total)
            parts["augment"].append(augment.total)
            parts["collate"].append(max(load - decode.total - augment.total, 0.0))
            for key, value in zip(("matching", "forward", "loss", "backward", "optimiser", "logging"),
                                  (t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
                parts[key].append(value)
        step += 1

    medians = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(medians.values())
    data = medians["decode"] + medians["augment"] + medians["collate"]
    print(f"config: {cfg.dataset.name} (cache {cfg.dataset.cache}, max side {cfg.dataset.cache_max_side}), "
          f"{cfg.model.name} {cfg.model.input_width}x{cfg.model.input_height}, batch {cfg.train.batch_size}, "
          f"threads {args.threads}, bf16 {args.bf16}, compile {args.compile}, {args.steps - 1} steps timed")
    if args.compile:
        print(f"compile (first forward+backward): {compile_s:.1f} s")
    print(" | ".join(f"{k} {1e3 * v:.0f} ms ({100 * v / total:.0f}%)" for k, v in medians.items()))
    print(f"step {1e3 * total:.0f} ms: data {1e3 * data:.0f} ms ({100 * data / total:.1f}%), "
          f"compute {1e3 * (total - data):.0f} ms")


if __name__ == "__main__":
    main()
