"""Measure what the default training step spends on data loading, diagnosis and validation.

    python scripts/bench_train_overhead.py [--steps 30] [--threads 2] [--workers 0]

Prints, for the default config (ssd_slim, synthetic, batch 32): the median time of a training step
(the loop's ``train_step``: matching, forward, loss, backward, optimiser), of the data loading per
batch, of one gradient-norm sample of the two loss terms (the step with the sample minus the step
without, alternating), of ``Diagnoser.observe_step``, and of one full validation pass, each as a share of
an epoch's wall time, averaged over the run (the samples are taken every
``diagnosis.grad_norm_every_first_part`` steps in the first part of training and every
``diagnosis.grad_norm_every`` after: ``Diagnoser.samples_gradients``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detlab.config import compose_config
from detlab.data import build_datasets, build_loader
from detlab.diagnosis import Diagnoser
from detlab.schedule import stage_boundaries
from detlab.engine.step import build_training
from detlab.engine.validation import validate
from detlab.errors import report_user_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config(overrides=args.overrides)
    device = torch.device("cpu")
    train_set, val_set = build_datasets(cfg)
    loader = build_loader(train_set, cfg.train.batch_size, shuffle=True, num_workers=args.workers,
                          seed=0, drop_last=True)
    val_loader = build_loader(val_set, cfg.train.batch_size, shuffle=False, num_workers=args.workers, seed=0)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    parts = build_training(cfg, device, total_steps, steps_per_epoch)
    stages = stage_boundaries(cfg.stages, cfg.schedule, total_steps, steps_per_epoch)
    diagnoser = Diagnoser(cfg.diagnosis, stages, total_steps, steps_per_epoch)
    parts.model.train()

    data_t, step_t, sampled_t, observe_t = [], [], [], []
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
            sample = step % 2 == 1  # alternate, so drift hits both kinds alike
            record = parts.step(images, [t["boxes"] for t in targets], step, grad_clip_norm=cfg.optim.grad_clip_norm,
                                sample_gradients=sample)
            t2 = time.perf_counter()
            diagnoser.observe_step(step, 1, record.signals())
            t3 = time.perf_counter()
            if step > 0:  # the first step pays one-off allocation costs
                data_t.append(t1 - t0)
                (sampled_t if sample else step_t).append(t2 - t1)
                observe_t.append(t3 - t2)
            step += 1

    t0 = time.perf_counter()
    validate(parts.model, val_loader, parts.criterion, cfg.eval, device, step, amp=parts.amp,
             num_images=cfg.eval.num_logged_images)
    val_s = time.perf_counter() - t0

    med = statistics.median
    data, bare, observe = med(data_t), med(step_t), med(observe_t)
    grad = max(med(sampled_t) - bare, 0.0)
    samples = sum(diagnoser.samples_gradients(s) for s in range(total_steps)) / cfg.train.epochs  # an epoch's mean
    train_epoch = steps_per_epoch * (data + bare + observe) + samples * grad
    epoch = train_epoch + val_s
    print(f"config: {cfg.model.name} (autocast {parts.amp}), batch {cfg.train.batch_size}, {len(train_set)} train / {len(val_set)} val "
          f"images, {steps_per_epoch} steps per epoch, torch threads {args.threads}, workers {args.workers}")
    print(f"median per step: data {data * 1e3:.1f} ms | train_step {bare * 1e3:.1f} ms | "
          f"grad-norm sample {grad * 1e3:.1f} ms ({samples:.1f} an epoch on average: every "
          f"{cfg.diagnosis.grad_norm_every_first_part} steps in the first {diagnoser.run.first_part_end}, then every "
          f"{cfg.diagnosis.grad_norm_every}) | observe_step {observe * 1e6:.1f} us")
    print(f"validation pass: {val_s:.2f} s")
    print(f"share of an epoch ({epoch:.1f} s): data {100 * steps_per_epoch * data / epoch:.1f}% | "
          f"diagnosis {100 * (steps_per_epoch * observe + samples * grad) / epoch:.2f}% | "
          f"validation {100 * val_s / epoch:.1f}%")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
