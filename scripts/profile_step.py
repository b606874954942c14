"""Where a training step's time goes: decode, augment, matching, forward, loss, backward, optimiser, logging.

    python scripts/profile_step.py                                   # the default run (synthetic, ssd_slim)
    python scripts/profile_step.py dataset=widerface              # <paths.data_dir>/widerface (DETLAB_DATA)
    python scripts/profile_step.py --bf16 dataset.cache=ram          # any train.py override

Runs ``--steps`` real training steps of the config (its loader and augmentation, then the loop's
``train_step`` and ``Diagnoser.observe_step``) with ``--threads`` torch threads and prints the median
milliseconds of each part and its share of the step. Inside ``train_step`` the parts are timed by
wrapping its components (the criterion's matching, forward hooks on the model and the criterion, the
optimiser's ``step``); backward is the rest of the step (with zero_grad, clipping, the lr schedule).
``torch.compile`` is measured by ``scripts/bench_precision.py --compile``. The decoded-image cache is warmed by ``--warm-epochs`` passes first when it
is on (``dataset.cache=ram|disk``), so the figures are those of a later epoch; ``--no-warm`` shows the
first. Data loading runs in the main process (``num_workers=0``), so its parts are timed directly:
decode is the image decoder (or cache), augment is the transform pipeline, collate the remainder.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from detlab.config import compose_config
from detlab.data import build_datasets, build_loader
from detlab.diagnosis import Diagnoser
from detlab.schedule import stage_boundaries
from detlab.engine.step import build_training
from detlab.errors import report_user_errors


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


class ModuleTimer:
    """Adds the wall time of every forward of ``module`` to ``total`` (forward hooks)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._begin)
        module.register_forward_hook(self._end)

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU); without it float32")
    parser.add_argument("--warm-epochs", type=int, default=1)
    parser.add_argument("--no-warm", action="store_true")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. dataset=widerface")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config(overrides=[*args.overrides, f"train.cpu_bf16={str(args.bf16).lower()}"])
    torch.manual_seed(0)
    train_set, _ = build_datasets(cfg)
    decode = train_set.cache.decode = Timed(train_set.cache.decode)
    augment = train_set.transform = Timed(train_set.transform)
    loader = build_loader(train_set, cfg.train.batch_size, shuffle=True, num_workers=0, seed=0, drop_last=True)
    if cfg.dataset.cache != "none" and not args.no_warm:
        for _ in range(args.warm_epochs):
            for index in range(len(train_set)):
                train_set.cache.get(train_set.images_dir / train_set.records[index].path)

    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    device = torch.device("cpu")
    parts = build_training(cfg, device, total_steps, steps_per_epoch)
    parts.model.train()
    matching = parts.criterion.match = Timed(parts.criterion.match)
    forward, criterion = ModuleTimer(parts.model), ModuleTimer(parts.criterion)
    optimiser = parts.optimizer.step = Timed(parts.optimizer.step)
    diagnoser = Diagnoser(cfg.diagnosis, stage_boundaries(cfg.stages, cfg.schedule, total_steps, steps_per_epoch),
                          total_steps, steps_per_epoch)

    names = ("decode", "augment", "collate", "matching", "forward", "loss", "backward", "optimiser", "logging")
    parts_ms: dict[str, list[float]] = {k: [] for k in names}
    step = 0
    batches = iter(loader)
    while step < args.steps:
        for timer in (decode, augment, matching, forward, criterion, optimiser):
            timer.total = 0.0
        t0 = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        t1 = time.perf_counter()
        record = parts.step(images, [t["boxes"] for t in targets], step, grad_clip_norm=cfg.optim.grad_clip_norm)
        t2 = time.perf_counter()
        diagnoser.observe_step(step, 1, record.signals())
        t3 = time.perf_counter()
        if step > 0:  # the first step pays one-off allocations
            load, train = t1 - t0, t2 - t1
            loss = criterion.total - matching.total
            values = {"decode": decode.total, "augment": augment.total,
                      "collate": max(load - decode.total - augment.total, 0.0), "matching": matching.total,
                      "forward": forward.total, "loss": loss, "optimiser": optimiser.total,
                      "backward": max(train - forward.total - criterion.total - optimiser.total, 0.0),
                      "logging": t3 - t2}
            for key, value in values.items():
                parts_ms[key].append(value)
        step += 1

    medians = {k: statistics.median(v) for k, v in parts_ms.items()}
    total = sum(medians.values())
    data = medians["decode"] + medians["augment"] + medians["collate"]
    print(f"config: {cfg.dataset.name} (cache {cfg.dataset.cache}, max side {cfg.dataset.cache_max_side}), "
          f"{cfg.model.name} {cfg.model.input_width}x{cfg.model.input_height}, batch {cfg.train.batch_size}, "
          f"threads {args.threads}, bf16 {args.bf16}, {args.steps - 1} steps timed")
    print(" | ".join(f"{k} {1e3 * v:.0f} ms ({100 * v / total:.0f}%)" for k, v in medians.items()))
    print(f"step {1e3 * total:.0f} ms: data {1e3 * data:.0f} ms ({100 * data / total:.1f}%), "
          f"compute {1e3 * (total - data):.0f} ms")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
