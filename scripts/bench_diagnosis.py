"""Fault-injection benchmark of the training diagnosis: does it name the failure, how early, how often
does it cry wolf, what does it cost, and how do published rule-based tools do on the same runs?

    python scripts/bench_diagnosis.py                           # 12 faults x 3 seeds + 20 healthy runs
    python scripts/bench_diagnosis.py --seeds 1 --healthy 4 --epochs 3 --jobs 2    # a quick look
    python scripts/bench_diagnosis.py --seed-offset 100         # fresh seeds (confirm after tuning)

Each run is a short training run of the default dataset (``--epochs`` epochs) in its own process,
``--jobs`` at a time (``cores // jobs`` torch threads each). A fault is injected by config overrides
or, where no config key expresses it (unnormalised input, label noise, xywh boxes, a frozen backbone,
images without faces), by patching the data or the model inside that process: the product has no
fault switches. Every run records its per-step signals (``steps.json``) beside its usual files, so
the baselines of ``scripts/diagnosis_baselines.py`` (AUTOTRAINER, SageMaker Debugger, Lightning's
EarlyStopping) replay them at no training cost.

Per fault class: the share of runs flagged (any finding), the share whose first finding is one of the
class's expected detectors (``FAULTS``), and the median step of the first finding as a fraction of
the run. Healthy runs (seeds, lr within 2x of the default, batch 16 and 32, ssd_slim and
ssd_mobilenet_v2) give the false-alarm rate. ``--overhead-pairs`` times default runs with and without
the diagnosis, alternating, alone. Writes ``<out>/bench_diagnosis.json`` and ``.md`` and prints, as its
last line, one JSON object with ``flagged_rate``, ``correct_rate``, ``false_alarm_rate``,
``median_detect_fraction``, ``overhead``, ``runs`` and ``baselines``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# name -> (overrides, expected first detectors). Overrides starting with "inject:" are patches.
FAULTS: dict[str, tuple[list[str], set[str]]] = {
    "lr_x100": (["optim.lr=1.0"], {"divergence"}),
    "lr_x0.001": (["optim.lr=1e-5"], {"stuck", "avoidance"}),
    "box_weight_100": (["loss.box_weight=100"], {"loss_imbalance"}),
    "box_weight_0.001": (["loss.box_weight=0.001"], {"loss_imbalance"}),
    "no_mining": (["loss.neg_pos_ratio=0"], {"avoidance"}),
    "no_warmup_high_lr": (["schedule.warmup=false", "optim.lr=0.1"], {"divergence", "random_large_boxes", "stuck"}),
    "anchors_4x": (["model.min_sizes=[[40,64,96],[128,192],[256,384],[512,768,1024]]"],
                   {"avoidance", "random_large_boxes", "under_confidence"}),
    "not_normalised": (["inject:not_normalised"], {"divergence", "stuck"}),
    "label_noise_30": (["inject:label_noise"], {"under_confidence", "overfitting", "small_fp_explosion"}),
    "xywh_boxes": (["inject:xywh_boxes"], {"avoidance", "random_large_boxes"}),
    "frozen_backbone": (["inject:frozen_backbone"], {"stuck", "avoidance", "under_confidence"}),
    "most_images_empty": (["inject:most_images_empty"], {"avoidance", "under_confidence"}),
}
# What a baseline's rule means in the diagnosis's vocabulary (for "right first diagnosis").
BASELINE_PATTERNS = {
    "exploding_gradient": "divergence", "vanishing_gradient": "stuck", "slow_convergence": "stuck",
    "oscillating_loss": "divergence", "dying_relu": "stuck", "loss_not_decreasing": "stuck",
    "overfit": "overfitting", "check_finite": "divergence", "divergence_threshold": "divergence",
    "patience": "stuck",
}
HEALTHY_LRS = (0.005, 0.01, 0.02)
HEALTHY_BATCHES = (32, 16)
HEALTHY_MODELS = ("ssd_slim", "ssd_mobilenet_v2")


@dataclass
class RunSpec:
    name: str
    kind: str  # fault | healthy | overhead
    fault: Optional[str]
    overrides: list[str]
    run_dir: str
    expected: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ the worker
def inject(name: str) -> None:
    """Patch the data or the model of this process (the injected fault of a run)."""
    import detlab.data.transforms as transforms
    import detlab.engine.step as step_module
    import detlab.engine.trainer as trainer_module

    if name == "not_normalised":  # pixels 0..255 reach the network
        transforms.IMAGENET_MEAN, transforms.IMAGENET_STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)
        return
    if name == "frozen_backbone":
        build_model = step_module.build_model

        def frozen(cfg):
            model = build_model(cfg)
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            return model

        step_module.build_model = frozen
        return
    build_datasets = trainer_module.build_datasets

    def with_bad_labels(cfg):
        train_set, val_set = build_datasets(cfg)
        return LabelFault(train_set, name), val_set

    assert name in ("label_noise", "xywh_boxes", "most_images_empty"), name
    trainer_module.build_datasets = with_bad_labels


class LabelFault(torch.utils.data.Dataset):
    """The training set with a label bug: 30% of the boxes shifted by up to half their size,
    boxes as xywh where xyxy is expected, or 90% of the images stripped of their faces."""

    def __init__(self, dataset: Any, fault: str) -> None:
        self.dataset, self.fault = dataset, fault

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if item is None:
            return item
        image, target = item
        boxes = target["boxes"]
        g = torch.Generator().manual_seed(index)
        if self.fault == "label_noise" and len(boxes):
            size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            noisy = torch.rand(len(boxes), generator=g) < 0.3
            shift = (torch.rand(len(boxes), 2, generator=g) - 0.5) * size[:, :2]
            boxes = torch.where(noisy[:, None], boxes + shift.repeat(1, 2), boxes)
        elif self.fault == "xywh_boxes":
            boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        elif self.fault == "most_images_empty" and torch.rand(1, generator=g).item() < 0.9:
            boxes = boxes[:0]
            target = {**target, "labels": target["labels"][:0]}
        return image, {**target, "boxes": boxes}


def worker(spec: RunSpec) -> None:
    """One run in this process: compose, inject, train, and keep the per-step signals."""
    from detlab.config import compose_config
    from detlab.diagnosis import Diagnoser
    from detlab.engine.trainer import train
    from detlab.fileio import write_json

    overrides = [o for o in spec.overrides if not o.startswith("inject:")]
    for o in spec.overrides:
        if o.startswith("inject:"):
            inject(o.split(":", 1)[1])
    cfg = compose_config(CONFIGS, overrides)
    record: dict[str, Any] = {"total_steps": None, "steps": []}
    init, observe_step = Diagnoser.__init__, Diagnoser.observe_step

    def init_recording(self, cfg, stages, total_steps, *a, **kw):
        record["total_steps"] = int(total_steps)
        init(self, cfg, stages, total_steps, *a, **kw)

    def recording(self, step, epoch, signals):
        record["steps"].append({"step": int(step), "epoch": int(epoch), **{k: float(v) for k, v in signals.items()}})
        return observe_step(self, step, epoch, signals)

    Diagnoser.__init__, Diagnoser.observe_step = init_recording, recording
    try:
        train(cfg, Path(spec.run_dir), overrides)
    finally:
        write_json(Path(spec.run_dir) / "steps.json", record)


# ----------------------------------------------------------------------------- the orchestrator
def plan(args: argparse.Namespace, out: Path) -> list[RunSpec]:
    base = [f"train.epochs={args.epochs}", "eval.num_logged_images=0"]
    specs = []
    for fault, (overrides, expected) in FAULTS.items():
        if args.faults and fault not in args.faults:
            continue
        for k in range(args.seeds):
            seed = args.seed_offset + k
            name = f"{fault}_s{seed}"
            specs.append(RunSpec(name, "fault", fault, [*base, f"train.seed={seed}", *overrides],
                                 str(out / "runs" / name), sorted(expected)))
    for k in range(args.healthy):
        seed = args.seed_offset + k
        lr = HEALTHY_LRS[k % len(HEALTHY_LRS)]
        batch = HEALTHY_BATCHES[(k // len(HEALTHY_LRS)) % len(HEALTHY_BATCHES)]
        model = HEALTHY_MODELS[1] if k % 5 == 4 else HEALTHY_MODELS[0]
        name = f"healthy_{model}_lr{lr:g}_b{batch}_s{seed}"
        specs.append(RunSpec(name, "healthy", None, [*base, f"train.seed={seed}", f"optim.lr={lr}",
                                                     f"train.batch_size={batch}", f"model={model}"],
                             str(out / "runs" / name)))
    return specs


def launch(spec: RunSpec, threads: int) -> float:
    """Run one spec in a fresh process (faults must not leak); returns its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(Path(spec.run_dir) / "worker.log", "w") as log:
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec.__dict__),
                        f"--threads={threads}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def load_result(spec: RunSpec) -> dict[str, Any]:
    """The run's findings and signals, and the baselines' replay of them."""
    from diagnosis_baselines import replay_all

    from detlab.report import read_metrics_csv

    run_dir = Path(spec.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    record = json.loads((run_dir / "steps.json").read_text()) if (run_dir / "steps.json").is_file() else {}
    steps = record.get("steps", [])
    epochs = read_metrics_csv(run_dir / "metrics.csv")
    total = max(1, int(record.get("total_steps") or 1))
    findings = summary.get("findings", [])
    first = min(findings, key=lambda f: f["step"]) if findings else None
    baselines = {}
    for name, alarm in replay_all(steps, epochs, total).items():
        baselines[name] = None if alarm is None else {"rule": alarm.rule, "step": alarm.step,
                                                      "pattern": BASELINE_PATTERNS.get(alarm.rule)}
    return {"name": spec.name, "kind": spec.kind, "fault": spec.fault, "expected": spec.expected,
            "status": summary.get("status", "missing"), "total_steps": total,
            "findings": [(f["detector"], f["step"]) for f in findings],
            "first": None if first is None else {"detector": first["detector"], "step": first["step"]},
            "final_ap50": (epochs[-1].get("val/ap50") if epochs else None), "baselines": baselines}


def score(results: list[dict[str, Any]], pick) -> dict[str, Any]:
    """Flagged, right-first and detection-time figures of one detector set (``pick(result)`` gives
    its first alarm as ``{"pattern" or "detector", "step"}`` or None)."""
    faulty = [r for r in results if r["kind"] == "fault"]
    healthy = [r for r in results if r["kind"] == "healthy"]
    per_class: dict[str, dict[str, Any]] = {}
    flagged = correct = 0
    fractions = []
    for fault in sorted({r["fault"] for r in faulty}):
        runs = [r for r in faulty if r["fault"] == fault]
        hits = [pick(r) for r in runs]
        right = [h is not None and (h.get("pattern") or h.get("detector")) in r["expected"] for h, r in zip(hits, runs)]
        when = [h["step"] / r["total_steps"] for h, r in zip(hits, runs) if h is not None]
        per_class[fault] = {"runs": len(runs), "flagged": sum(h is not None for h in hits) / len(runs),
                            "correct": sum(right) / len(runs),
                            "median_detect_fraction": statistics.median(when) if when else None,
                            "first": [None if h is None else (h.get("pattern") or h.get("detector")) for h in hits]}
        flagged += sum(h is not None for h in hits)
        correct += sum(right)
        fractions += when
    return {"flagged_rate": flagged / len(faulty) if faulty else None,
            "correct_rate": correct / len(faulty) if faulty else None,
            "false_alarm_rate": (sum(pick(r) is not None for r in healthy) / len(healthy)) if healthy else None,
            "median_detect_fraction": statistics.median(fractions) if fractions else None,
            "per_class": per_class}


def measure_overhead(args: argparse.Namespace, out: Path) -> Optional[float]:
    """Wall time of default runs with the diagnosis over without it, alternating, one at a time."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for k in range(args.overhead_pairs):
        for enabled in (False, True):
            name = f"overhead_{'on' if enabled else 'off'}_{k}"
            spec = RunSpec(name, "overhead", None, [f"train.epochs={args.epochs}", "eval.num_logged_images=0",
                                                    f"diagnosis.enabled={str(enabled).lower()}"],
                           str(out / "runs" / name))
            times[enabled].append(launch(spec, os.cpu_count() or 1))
    if not times[True]:
        return None
    return statistics.median(times[True]) / statistics.median(times[False]) - 1.0


def markdown(report: dict[str, Any]) -> str:
    systems = {"detlab": report["detlab"], **report["baselines"]}
    lines = ["| system | flagged | right first | false alarms | median detection (fraction of run) |",
             "|---|---|---|---|---|"]
    for name, s in systems.items():
        lines.append(f"| {name} | {_pct(s['flagged_rate'])} | {_pct(s['correct_rate'])} | "
                     f"{_pct(s['false_alarm_rate'])} | {_num(s['median_detect_fraction'])} |")
    lines += ["", "| fault | expected | detlab flagged | detlab right | detlab first findings |", "|---|---|---|---|---|"]
    for fault, c in report["detlab"]["per_class"].items():
        lines.append(f"| {fault} | {', '.join(sorted(FAULTS[fault][1]))} | {_pct(c['flagged'])} | {_pct(c['correct'])} | "
                     f"{', '.join(str(f) for f in c['first'])} |")
    lines += ["", f"Overhead against `diagnosis.enabled=false`: {_pct(report['overhead'])}; "
                  f"{report['runs']} runs, {report['wall_time_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs per fault class")
    parser.add_argument("--healthy", type=int, default=20, help="healthy runs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (25 steps each)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed (fresh seeds: e.g. 100)")
    parser.add_argument("--faults", nargs="*", default=None, help=f"a subset of {', '.join(FAULTS)}")
    parser.add_argument("--overhead-pairs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_diagnosis")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        worker(RunSpec(**json.loads(args.worker)))
        return 0

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    specs = plan(args, out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each thread waits on one run's process
        for spec, seconds in zip(specs, pool.map(lambda s: launch(s, threads), specs)):
            print(f"{spec.name}: {seconds:.0f} s", flush=True)
    results = [load_result(s) for s in specs]
    overhead = measure_overhead(args, out)
    report: dict[str, Any] = {
        "detlab": score(results, lambda r: r["first"]),
        "baselines": {name: score(results, lambda r, n=name: r["baselines"].get(n))
                      for name in sorted({n for r in results for n in r["baselines"]})},
        "overhead": overhead, "runs": len(results), "wall_time_s": time.perf_counter() - t0,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    from detlab.fileio import atomic_write_text, write_json

    write_json(out / "bench_diagnosis.json", report)
    table = markdown(report)
    atomic_write_text(out / "bench_diagnosis.md", table)
    print(table)
    keys = ("flagged_rate", "correct_rate", "false_alarm_rate", "median_detect_fraction")
    last = {**{k: report["detlab"][k] for k in keys}, "overhead": overhead, "runs": len(results),
            "baselines": {n: {k: s[k] for k in keys} for n, s in report["baselines"].items()}}
    print(json.dumps(last), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
