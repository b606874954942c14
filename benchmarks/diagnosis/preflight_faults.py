"""What the pre-flight checks name before step 1 on each run of the diagnosis benchmark's spec.

For every fault class and healthy group of ``spec.yaml`` (its first seed of the chosen set), the run is
built exactly as the benchmark trains it (its overrides, the injection through the trainer's dataset and
model factories) and the pre-flight checks run on it (``detlab.engine.preflight.run_preflight``); nothing
trains. Prints a Markdown table: run, expected detectors, the fatal and warning checks, the seconds.

    python -m benchmarks.diagnosis.preflight_faults [--seed-set tune] [--only 'fault-*']

Runs that need data or weights this machine lacks are listed as skipped.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from typing import Optional

import torch

from benchmarks.diagnosis.bench_diagnosis import missing_requirements
from benchmarks.diagnosis.faults import dataset_factory, model_factory
from benchmarks.diagnosis.spec import SEED_SETS, PlannedRun, load_spec, plan_runs
from detlab.config import compose_config
from detlab.engine.preflight import run_preflight
from detlab.engine.step import build_training
from detlab.engine.training_data import build_training_data
from detlab.runtime.seeding import seed_everything


def preflight_of(run: PlannedRun) -> dict:
    """The pre-flight report of ``run`` as the benchmark builds it (``summary.json``'s ``preflight``)."""
    cfg = compose_config(overrides=[*run.overrides, "diagnosis.preflight=warn", "train.device=cpu"])
    seed_everything(cfg.train.seed)
    data = build_training_data(cfg, dataset_factory(run.inject), world_size=1, rank=0)
    steps_per_epoch = len(data.train_loader)
    total = cfg.train.epochs * steps_per_epoch
    parts = build_training(cfg, torch.device("cpu"), total, steps_per_epoch, model_factory(run.inject))
    report = run_preflight(cfg, data.train_set, data.train_loader.collate_fn, parts.model, parts.criterion,
                           torch.device("cpu"), parts.amp, total, steps_per_epoch)
    return report.to_dict()


def first_of_each(runs: list[PlannedRun]) -> list[PlannedRun]:
    """One run per fault class / healthy variant: the first seed."""
    seen, out = set(), []
    for run in runs:
        key = run.name.rsplit("-s", 1)[0]
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-set", choices=SEED_SETS, default="tune")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN", help="run names (shell patterns)")
    args = parser.parse_args(argv)
    spec = load_spec()
    runs = [r for r in first_of_each(plan_runs(spec, args.seed_set)) if r.kind != "overhead"]
    if args.only:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in args.only)]
    print(f"spec v{spec.version} (sha256 {spec.sha256[:12]}), {args.seed_set} seeds, the first seed of each: "
          f"{len(runs)} runs\n")
    print("| run | expected detectors | fatal | warnings | seconds |\n|---|---|---|---|---|")
    for run in runs:
        missing = missing_requirements(run)
        if missing:
            print(f"| {run.name} | {', '.join(run.expected) or '-'} | skipped: needs {', '.join(missing)} | | |")
            continue
        report = preflight_of(run)
        by = {s: sorted({f["check"] for f in report["findings"] if f["severity"] == s}) for s in ("fatal", "warning")}
        print(f"| {run.name} | {', '.join(run.expected) or '-'} | {', '.join(by['fatal']) or '-'} | "
              f"{', '.join(by['warning']) or '-'} | {report['seconds']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
