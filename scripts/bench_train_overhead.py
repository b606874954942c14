"""Measure what the default training step spends on data loading, diagnosis and validation.

    python scripts/bench_train_overhead.py [--steps 30] [--threads 2] [--workers 0]

Prints, for the default config (ssd_slim, synthetic, batch 32): the median time of a bare training
step (forward, loss, backward, SGD), of the data loading per batch, of one gradient-norm sample of
the two loss terms (taken every ``diagnosis.grad_norm_every`` steps), of ``Diagnoser.observe_step``,
and of one full validation pass, each as a share of an epoch's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from detlab.config import compose_config
from detlab.data import build_datasets, build_loader
from detlab.diagnosis import Diagnoser, loss_term_grad_norms
from detlab.engine.optim import build_optimizer
from detlab.engine.validation import validate
from detlab.loss import MultiBoxLoss
from detlab.model import build_model
from detlab.model.matching import assign_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config(CONFIGS, args.overrides)
    train_set, val_set = build_datasets(cfg)
    loader = build_loader(train_set, cfg.train.batch_size, shuffle=True, num_workers=args.workers,
                          seed=0, drop_last=True)
    val_loader = build_loader(val_set, cfg.train.batch_size, shuffle=False, num_workers=args.workers, seed=0)
    model = build_model(cfg.model)
    criterion = MultiBoxLoss(cfg.loss)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    steps_per_epoch = len(loader)
    diagnoser = Diagnoser(cfg.diagnosis, steps_per_epoch * cfg.train.epochs, steps_per_epoch, 10, 100)
    shared = list(model.shared_parameters())

    data_t, step_t, grad_t, observe_t = [], [], [], []
    step = 0
    while step < args.steps:
        batches = iter(loader)
        while step < args.steps:
            t0 = time.perf_counter()
            try:
                images, targets = next(batches)
            except StopIteration:
                break
            t1 = time.perf_counter()
            labels, box_targets = assign_targets(model.anchors, [t["boxes"] for t in targets], model.box_coder,
                                                 cfg.model.match_iou)
            out = model(images)
            losses = criterion(out["cls_logits"], out["bbox_regression"], labels, box_targets)
            t2 = time.perf_counter()
            g_cls, g_box = loss_term_grad_norms(losses["loss_cls"], losses["loss_box"], shared)
            t3 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses["loss_total"].backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
            optimizer.step()
            t4 = time.perf_counter()
            signals = {"loss_cls": float(losses["loss_cls"].detach()), "loss_box": float(losses["loss_box"].detach()),
                       "loss_total": float(losses["loss_total"].detach()), "lr": 0.01, "grad_norm": grad_norm,
                       "grad_norm_cls": g_cls, "grad_norm_box": g_box, "num_pos": float(losses["num_pos"])}
            diagnoser.observe_step(step, 1, signals)
            t5 = time.perf_counter()
            if step > 0:  # the first step pays one-off allocation costs
                data_t.append(t1 - t0)
                step_t.append((t2 - t1) + (t4 - t3))
                grad_t.append(t3 - t2)
                observe_t.append(t5 - t4)
            step += 1

    t0 = time.perf_counter()
    validate(model, val_loader, criterion, cfg.model, cfg.eval, torch.device("cpu"), num_images=cfg.eval.num_logged_images)
    val_s = time.perf_counter() - t0

    med = statistics.median
    data, bare, grad, observe = med(data_t), med(step_t), med(grad_t), med(observe_t)
    every = cfg.diagnosis.grad_norm_every
    train_epoch = steps_per_epoch * (data + bare + observe) + (steps_per_epoch / every) * grad
    epoch = train_epoch + val_s
    print(f"config: {cfg.model.name}, batch {cfg.train.batch_size}, {len(train_set)} train / {len(val_set)} val "
          f"images, {steps_per_epoch} steps per epoch, torch threads {args.threads}, workers {args.workers}")
    print(f"median per step: data {data * 1e3:.1f} ms | forward+loss+backward+step {bare * 1e3:.1f} ms | "
          f"grad-norm sample {grad * 1e3:.1f} ms (every {every} steps) | observe_step {observe * 1e6:.1f} us")
    print(f"validation pass: {val_s:.2f} s")
    print(f"share of an epoch ({epoch:.1f} s): data {100 * steps_per_epoch * data / epoch:.1f}% | "
          f"diagnosis {100 * (steps_per_epoch * observe + steps_per_epoch / every * grad) / epoch:.2f}% | "
          f"validation {100 * val_s / epoch:.1f}%")


if __name__ == "__main__":
    main()
