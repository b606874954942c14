"""Fault-injection benchmark of the training diagnosis, run from its pre-registered spec
(``benchmarks/diagnosis/spec.yaml``): does it name the failure, how early, how often does it cry wolf,
what does it cost, and how do published rule-based tools do on the same runs?

    python -m benchmarks.diagnosis.bench_diagnosis --plan                          # the runs, parts, estimated time
    python -m benchmarks.diagnosis.bench_diagnosis --part 3/40 --seed-set tune     # train one slice, record it
    python -m benchmarks.diagnosis.bench_diagnosis --replay --seed-set tune        # score what is recorded
    python -m benchmarks.diagnosis.bench_diagnosis --replay --set diagnosis.stuck.min_drop=0.03   # tuning
    python -m benchmarks.diagnosis.bench_diagnosis --part 1/1 --gpu --seed-set tune               # the GPU-only classes
    python -m benchmarks.diagnosis.bench_diagnosis --plan --repairs --seed-set confirm           # the repairs' runs

The spec lists the fault classes (config overrides and/or an injection of ``faults.py``, through the
trainer's dataset and model factories: nothing in the package is patched), the healthy runs, the run
lengths and the seeds for tuning and for confirmation. ``--part K/N`` trains the K-th of N deterministic
slices of a seed set's runs (about equal estimated time), each run in its own process, ``--jobs`` at a time
(the overhead pairs last, alone), and leaves per run a compact recording
(``benchmarks/diagnosis/recordings/v<version>/<run>.json.gz``: per-step signals, epoch rows, the summary's
findings and status, the config sections a replay needs), stamped with the spec's sha256. A run already
recorded under the same hash is not trained again.

``--replay`` scores every recording of the seed set made under the current spec hash: the findings of
today's detectors replayed on the recorded signals (``--recorded-findings``: the runs' own), outcome
labels (the spec's ``outcome``: failed under half the median of the recipe's reference healthy runs, or
diverged; healthy at >= 80% of it), detection against the outcome, the right first diagnosis against the
declared class, the notes on their own line, and the published baselines (``baselines.py``) replayed at
the granularity their rules assume. Targets are judged for the confirm seeds only. Writes
``<out>/bench_diagnosis_<seed set>.json`` and ``.md`` and prints, last, one JSON line.

``--max-epochs E`` shortens every run to at most E epochs (a smoke test); its recordings go to
``outputs/bench_diagnosis/recordings-short`` unless ``--recordings`` says otherwise, and never meet targets.
``--repairs`` trains with the repairs on (``repairs.yaml``'s switch appended; recordings
``v<version>-repairs``) only the runs its pre-registration measures: the rescuable classes' runs and the
healthy runs on which a repair may act (a failure finding a repair answers in the recording without repairs, or no
such recording yet). That plan reads the recordings present when it is made, so record the runs without
repairs first; a run it missed is listed by ``--replay --repairs`` (``not_recorded``), and ``--part 1/1``
again trains only what is missing. ``--replay --repairs`` scores the runs against their twins without
repairs: the rescued runs and classes, the healthy groups' AP50 change against their spread.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from benchmarks.diagnosis.recording import (
    RECORDINGS,
    Recording,
    bytes_per_step,
    list_recordings,
    read_recording,
    record_run_folder,
    recording_path,
    write_recording,
)
from benchmarks.diagnosis.repairs import (REPAIRS_PATH, Repairs, load_repairs, repair_plan, repairs_spec_path,
                                          switched_on_answers)
from benchmarks.diagnosis.scoring import RunResult, markdown, rescue, rescue_targets, score_all, targets
from benchmarks.diagnosis.spec import (
    FAULT,
    OVERHEAD,
    SEED_SETS,
    SPEC_PATH,
    PlannedRun,
    Spec,
    assign_parts,
    estimated_minutes,
    load_spec,
    parse_part,
    plan_runs,
)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "outputs" / "bench_diagnosis"


# ------------------------------------------------------------------------------------ the worker
def worker(job: dict[str, Any]) -> None:
    """One run in this process: compose, train with the injection's data and model factories and only the
    callbacks a recording needs (metrics.csv, config.yaml + summary.json, the signal recorder), then write
    its recording."""
    import torch

    from benchmarks.diagnosis.faults import SignalRecorder, dataset_factory, model_factory
    from detlab.config import compose_config
    from detlab.engine.loggers import MetricsCsv, RunRecordWriter
    from detlab.engine.trainer import train
    from detlab.runtime.provenance import cpu_info

    run = PlannedRun(**job["run"])
    steal_at_start = machine_steal_seconds()
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off mid-way starts again from scratch
    run_dir.mkdir(parents=True, exist_ok=True)
    # The benchmark measures the diagnosis during training: the pre-flight checks report what they see of
    # the injected fault (summary.json's "preflight") but never stop the run before it trains.
    cfg = compose_config(overrides=[*run.overrides, "diagnosis.preflight=warn"])
    recorder = SignalRecorder()

    def record() -> None:
        # the CPU too (v5): one benchmark's parts may run on machines of different speed
        extra = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info(),
                             "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                 "process": process_times(steal_at_start)}
        size = write_recording(job["recording"], record_run_folder(run_dir, run.to_dict(), job["spec_version"],
                                                                   job["spec_sha256"], recorder, job["shortened"], extra))
        print(f"recording: {job['recording']} ({size} bytes, {len(recorder.steps)} steps)", flush=True)

    try:
        train(cfg, run_dir, run.overrides, callbacks=[MetricsCsv(), RunRecordWriter(), recorder],
              dataset_factory=dataset_factory(run.inject), model_factory=model_factory(run.inject))
    except Exception:
        record()  # a run that crashed is recorded too (its outcome: error)
        raise
    record()


def machine_steal_seconds() -> Optional[float]:
    """CPU time the hypervisor gave to other guests, summed over this machine's CPUs since boot
    (``/proc/stat``'s steal column), or None where the system does not say."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def process_times(steal_at_start: Optional[float]) -> dict[str, Optional[float]]:
    """The run's process CPU time (user and system, all its threads) and the machine's steal time over the run
    (v6): on a shared virtual machine a wall time also holds what other guests took, which the CPU time
    leaves out and the steal time measures."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    steal = machine_steal_seconds()
    return {"cpu_user_s": usage.ru_utime, "cpu_system_s": usage.ru_stime,
            "machine_steal_s": None if steal is None or steal_at_start is None else steal - steal_at_start}


# ------------------------------------------------------------------------------- the orchestrator
def recordings_folder(args: argparse.Namespace, spec: Spec) -> tuple[Path, str]:
    """(root, version folder name) of this invocation's recordings."""
    root = args.recordings or (OUT / "recordings-short" if args.max_epochs else RECORDINGS)
    return Path(root), f"{spec.version}{'-repairs' if args.repairs else ''}"


def prepared(run: PlannedRun, args: argparse.Namespace, repairs: Optional[Repairs] = None) -> PlannedRun:
    """The run as this invocation trains it: the repairs' switch, the device and the shortening appended."""
    extra = [*(repairs.switch if repairs else []), *([f"train.device={args.device}"] if args.device else [])]
    if args.max_epochs:
        extra.append(f"train.epochs={min(args.max_epochs, _epochs(run))}")
    return PlannedRun(**{**run.to_dict(), "overrides": [*run.overrides, *extra]})


# Hydra's compose API keeps one global state: the parts' launcher threads compose one at a time (two at once
# raised "GlobalHydra is already initialized" and ended a part of the tune recording).
_COMPOSE = threading.Lock()


def _composed(run: PlannedRun) -> Any:
    from detlab.config import compose_config

    with _COMPOSE:
        return compose_config(overrides=run.overrides)


def _epochs(run: PlannedRun) -> int:
    return _composed(run).train.epochs


def missing_requirements(run: PlannedRun) -> list[str]:
    """What the run needs that this machine lacks: WIDER FACE, the pretrained backbone file, a GPU."""
    missing = []
    if run.gpu_only:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU")
    if run.requires:
        cfg = _composed(run)
        if "widerface" in run.requires and not Path(cfg.dataset.root).is_dir():
            missing.append(f"WIDER FACE at {cfg.dataset.root} (DETLAB_DATA)")
        weights = cfg.model.backbone_weights
        if "pretrained" in run.requires and weights not in ("none", "imagenet") and not Path(weights).is_file():
            missing.append(f"backbone weights {weights} (DETLAB_PRETRAINED)")
    return missing


def launch(run: PlannedRun, args: argparse.Namespace, spec: Spec, threads: int) -> tuple[float, str]:
    """Train one run in a fresh process (faults must not leak); returns (seconds, what happened)."""
    root, version = recordings_folder(args, spec)
    target = recording_path(root, version, run.name)
    if target.is_file():
        try:
            if read_recording(target).spec_sha256 == spec.sha256:
                return 0.0, "already recorded"
        except (OSError, ValueError):
            pass
    missing = missing_requirements(run)
    if missing:
        return 0.0, f"skipped: needs {', '.join(missing)}"
    run_dir = args.out / "runs" / version / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    job = {"run": run.to_dict(), "run_dir": str(run_dir), "recording": str(target), "spec_version": spec.version,
           "spec_sha256": spec.sha256, "shortened": bool(args.max_epochs)}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run.name}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.diagnosis.bench_diagnosis", "--worker",
                               json.dumps(job), f"--threads={threads}"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    what = "recorded" if target.is_file() else f"no recording (exit {proc.returncode}; see {log.name})"
    return seconds, what


def planned(args: argparse.Namespace, spec: Spec, seed_set: str, repairs: Optional[Repairs]) -> list[PlannedRun]:
    """The runs of ``seed_set`` this invocation trains: the spec's, or with --repairs the reduced plan; with
    --only, those whose name matches one of its patterns."""
    runs = plan_runs(spec, seed_set, gpu=args.gpu) if repairs is None else reduced_plan(args, spec, seed_set, repairs)[0]
    return only_matching(args, runs)


def only_matching(args: argparse.Namespace, runs: list[PlannedRun]) -> list[PlannedRun]:
    """With --only, the runs whose name matches one of its patterns."""
    if not args.only:
        return runs
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, pattern) for pattern in args.only)]


def reduced_plan(args: argparse.Namespace, spec: Spec, seed_set: str,
                 repairs: Repairs) -> tuple[list[PlannedRun], dict[str, list[str]], list[str]]:
    """(the runs to train with the repairs, in spec order; run name -> the detectors of its findings
    without repairs, for those recorded; the rescuable classes' fault runs left out because no finding of
    theirs is one a switched-on repair answers: each trains as its twin did)."""
    root, _ = recordings_folder(args, spec)
    plain = plain_detectors(root, spec, seed_set, benchmarked_diagnosis(spec), replay=not args.recorded_findings)
    with _COMPOSE:
        answers = switched_on_answers(repairs.switch)
    runs = repair_plan(spec, repairs, seed_set, plain, answers, gpu=args.gpu)
    kept = {r.name for r in runs}
    identical = [r.name for r in plan_runs(spec, seed_set, gpu=args.gpu)
                 if r.kind == FAULT and r.group in repairs.rescuable and r.name not in kept]
    return runs, plain, identical


def train_part(args: argparse.Namespace, spec: Spec, repairs: Optional[Repairs] = None) -> int:
    k, n = parse_part(args.part)
    mine = [prepared(r, args, repairs) for r in assign_parts(planned(args, spec, args.seed_set, repairs), n)[k - 1]]
    print(f"part {k}/{n} of the {args.seed_set} runs{' (GPU-only classes)' if args.gpu else ''}"
          f"{' with the repairs' if repairs else ''}: {len(mine)} runs, "
          f"about {estimated_minutes(mine):.0f} min alone on 2 cores", flush=True)
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.jobs)
    parallel = [r for r in mine if r.kind != OVERHEAD]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each thread waits on one run's process
        for run, (seconds, what) in zip(parallel, pool.map(lambda r: launch(r, args, spec, threads), parallel)):
            print(f"{run.name}: {what} ({seconds:.0f} s)", flush=True)
    for run in (r for r in mine if r.kind == OVERHEAD):  # timed alone, on every core
        seconds, what = launch(run, args, spec, cores)
        print(f"{run.name}: {what} ({seconds:.0f} s)", flush=True)
    return 0


def print_plan(args: argparse.Namespace, spec: Spec, repairs: Optional[Repairs] = None) -> int:
    print(f"spec v{spec.version} ({spec.path}), sha256 {spec.sha256}")
    if repairs is not None:
        return print_repair_plan(args, spec, repairs)
    for seed_set in SEED_SETS:
        cpu = plan_runs(spec, seed_set, gpu=False)
        gpu = plan_runs(spec, seed_set, gpu=True)
        kinds = {kind: sum(r.kind == kind for r in cpu) for kind in ("fault", "healthy", "overhead")}
        print(f"{seed_set} seeds {spec.seeds[seed_set]}: {len(cpu)} CPU runs ({', '.join(f'{v} {k}' for k, v in kinds.items())}), "
              f"about {estimated_minutes(cpu) / 60:.1f} h alone on 2 cores; {len(gpu)} GPU-only runs")
    if args.part:
        k, n = parse_part(args.part)
        for i, part in enumerate(assign_parts(planned(args, spec, args.seed_set, None), n), 1):
            if k and n > 1 and i != k and not args.all_parts:
                continue
            print(f"part {i}/{n}: {len(part)} runs, about {estimated_minutes(part):.1f} min")
            for r in part:
                print(f"  {r.name} ({r.minutes:g} min){' needs ' + ', '.join(r.requires) if r.requires else ''}")
    return 0


def print_repair_plan(args: argparse.Namespace, spec: Spec, repairs: Repairs) -> int:
    root, _ = recordings_folder(args, spec)
    print(f"repairs v{repairs.version} ({repairs.path}), sha256 {repairs.sha256}; switch {' '.join(repairs.switch)}")
    with _COMPOSE:
        answers = switched_on_answers(repairs.switch)
    print(f"runs re-run when their recording without repairs ({root / f'v{spec.version}'}) has a failure finding of "
          f"{', '.join(sorted(answers))} (the detectors the switched-on repairs answer), or is not recorded yet")
    plans = {}
    for seed_set in SEED_SETS:
        runs, plain, identical = reduced_plan(args, spec, seed_set, repairs)
        plans[seed_set] = runs
        healthy = [r for r in runs if r.kind == "healthy"]
        left_out = sum(r.kind == "healthy" for r in plan_runs(spec, seed_set, gpu=args.gpu)) - len(healthy)
        minutes = estimated_minutes(runs)
        print(f"{seed_set} seeds {spec.seeds[seed_set]} with the repairs: {len(runs)} "
              f"{'GPU-only' if args.gpu else 'CPU'} runs, about {minutes:.0f} min ({minutes / 60:.1f} h) alone on "
              f"2 cores: {len(runs) - len(healthy)} fault runs of the {len(repairs.rescuable)} rescuable classes "
              f"({len(identical)} left out: no such finding), {len(healthy)} healthy "
              f"({sum(r.name in plain for r in healthy)} with a failure finding a repair answers, "
              f"{sum(r.name not in plain for r in healthy)} not recorded yet; {left_out} left out: no such finding)")
    k, n = parse_part(args.part) if args.part else (1, 1)
    for i, part in enumerate(assign_parts(planned(args, spec, args.seed_set, repairs), n), 1):
        if n > 1 and i != k and not args.all_parts:
            continue
        print(f"{args.seed_set} part {i}/{n}: {len(part)} runs, about {estimated_minutes(part):.1f} min")
        for r in part:
            print(f"  {r.name} ({r.minutes:g} min){' needs ' + ', '.join(r.requires) if r.requires else ''}")
    return 0


# ------------------------------------------------------------------------------------ replay
def benchmarked_diagnosis(spec: Spec, extra: Optional[list[str]] = None) -> Any:
    """The diagnosis the benchmark measures (the product's defaults with the spec's overrides), then ``extra``."""
    from detlab.config import compose_config

    return compose_config(overrides=[*spec.diagnosis_overrides, *(extra or [])]).diagnosis


def recorded_sampling(rec: Recording) -> Optional[int]:
    """The finest gradient-sampling interval the run was recorded with (version 1: one for the whole run)."""
    block = rec.config.get("diagnosis", {})
    intervals = [block.get(key) for key in ("grad_norm_every", "grad_norm_every_first_part") if block.get(key)]
    return min(intervals) if intervals else None


def findings_of(rec: Recording, diagnosis: Any, replay: bool) -> tuple[list[dict[str, Any]], Optional[bool]]:
    """The run's findings ({"detector", "kind", "step", "failure", "risk"}; risk: a note that awaits a failure to
    confirm it, v6): replayed with ``diagnosis`` (None: the run's own block) or as recorded; and whether the
    replayed ones equal the run's own (None when not replayed)."""
    from detlab.diagnosis.detector import AWAITS_FAILURE
    from detlab.diagnosis.replay import replay_findings

    live = [{"detector": f["detector"], "kind": f.get("kind", ""), "step": int(f["step"]),
             "failure": bool(f.get("failure", True)),
             "risk": not f.get("failure", True) and f.get("evidence", {}).get(AWAITS_FAILURE, 0.0) > 0}
            for f in rec.summary.get("findings", [])]
    if not replay:
        return live, None
    findings = [{"detector": f.detector, "kind": f.kind, "step": f.step, "failure": f.failure,
                 "risk": not f.failure and f.evidence.get(AWAITS_FAILURE, 0.0) > 0}
                for f in replay_findings(rec.replay_config(diagnosis), rec.steps, rec.epochs, rec.total_steps,
                                         repaired=rec.summary.get("repairs"),
                                         sampled_every=recorded_sampling(rec))]
    return findings, [(f["detector"], f["step"]) for f in findings] == [(f["detector"], f["step"]) for f in live]


def plain_detectors(root: Path, spec: Spec, seed_set: str, diagnosis: Any, replay: bool) -> dict[str, list[str]]:
    """Run name -> the detectors of its failure findings and risks (notes that await a failure, which a repair
    may answer, v6), for the runs of ``seed_set`` recorded without repairs under the current spec (a run recorded
    under another spec counts as not recorded)."""
    out = {}
    for path in list_recordings(root, spec.version):
        rec = read_recording(path)
        if rec.spec_sha256 == spec.sha256 and rec.run.get("seed_set") == seed_set:
            # failure findings and risks: no repair answers another note
            out[rec.name] = [f["detector"] for f in findings_of(rec, diagnosis, replay)[0] if f["failure"] or f["risk"]]
    return out


def result_of(rec: Recording, spec: Spec, diagnosis: Any, replay: bool) -> tuple[RunResult, Optional[bool]]:
    """The scoring's view of one recording, and whether the replayed findings equal the run's own (None
    when not replayed)."""
    from benchmarks.diagnosis.baselines import replay_all

    findings, same = findings_of(rec, diagnosis, replay)
    alarms = replay_all(rec.steps, rec.epochs, rec.total_steps, scaled=True, steps_per_epoch=rec.steps_per_epoch)
    run = rec.run
    metric = rec.epochs[-1].get(spec.outcome.metric) if rec.epochs else None
    last_loss = rec.steps[-1].get("loss_total") if rec.steps else None
    return RunResult(name=run["name"], kind=run["kind"], group=run["group"], recipe=run["recipe"],
                     seed_set=run["seed_set"], seed=int(run["seed"]), variant=run.get("variant", ""),
                     reference=bool(run.get("reference", False)), expected=list(run.get("expected", [])),
                     status=str(rec.summary.get("status", "missing")), final_metric=metric,
                     final_train_loss=last_loss, total_steps=rec.total_steps, findings=findings,
                     baselines={name: None if a is None else {"rule": a.rule, "step": a.step}
                                for name, a in alarms.items()},
                     wall_time_s=rec.summary.get("wall_time_s"), process=dict(rec.process)), same


def load_results(root: Path, version: str, spec: Spec, seed_set: str, diagnosis: Any,
                 replay: bool) -> tuple[list[RunResult], list[Recording], list[str], list[str]]:
    """(results, their recordings, stale recordings' names, runs whose replay differs) of ``seed_set``."""
    results, used, stale, different = [], [], [], []
    for path in list_recordings(root, version):
        rec = read_recording(path)
        if rec.spec_sha256 != spec.sha256:
            stale.append(rec.name)
            continue
        if rec.run.get("seed_set") != seed_set:
            continue
        result, same = result_of(rec, spec, diagnosis, replay)
        results.append(result)
        used.append(rec)
        if same is False and result.kind != OVERHEAD:  # the overhead-off runs had no diagnosis to agree with
            different.append(rec.name)
    return results, used, stale, different


def score_recordings(args: argparse.Namespace, spec: Spec, repairs: Optional[Repairs] = None) -> int:
    from detlab.runtime.fileio import atomic_write_text, write_json

    # the benchmarked diagnosis, then --set; with --repairs each run's own diagnosis block, as it trained with
    # the switch on (the switch is the product's to define, so it is not composed here)
    diagnosis = None if repairs else benchmarked_diagnosis(spec, args.set)
    replay = not args.recorded_findings
    root, version = recordings_folder(args, spec)
    results, used, stale, different = load_results(root, version, spec, args.seed_set, diagnosis, replay)
    if args.expected_of:  # a later version's expected sets on older recordings (what its scoring says of them)
        later = load_spec(args.expected_of)
        for r in results:
            if r.kind == FAULT and r.group in later.faults:
                r.expected = list(later.faults[r.group].expected)
    shortened = any(r.shortened for r in used)
    scores = score_all(results, spec)
    report: dict[str, Any] = {
        "spec": {"version": spec.version, "sha256": spec.sha256, "path": spec.path},
        "baseline_settings": spec.baseline_settings,
        "seed_set": args.seed_set, "recordings": str(root / f"v{version}"), "runs": len(results),
        "stale": stale, "shortened": shortened,
        "findings_source": "replayed with today's detectors" + (f" ({' '.join(args.set)})" if args.set else "")
        if replay else "recorded by the runs",
        "expected_of": str(args.expected_of) if args.expected_of else None,
        "scores": scores,
        "recording_bytes": sum(r.size_bytes for r in used), "bytes_per_step": bytes_per_step(used),
        "replay_agreement": {"runs": sum(r.kind != OVERHEAD for r in results),
                             "same": sum(r.kind != OVERHEAD for r in results) - len(different), "different": different}
        if replay and not args.set and not spec.diagnosis_overrides else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    judged = args.seed_set == "confirm" and not shortened and not args.expected_of
    report["targets"] = targets(scores, spec.targets) if judged else None
    if repairs:
        # the twins' outcomes and bars only: their findings are not read, so they are not replayed
        plain, _, _, _ = load_results(root, str(spec.version), spec, args.seed_set, None, replay=False)
        wanted, _, identical = reduced_plan(args, spec, args.seed_set, repairs)  # the plain runs replayed once
        res = rescue(results, plain, spec, repairs, identical=identical)
        if res is not None:
            recorded = {r.name for r in results}
            res["not_recorded"] = [r.name for r in only_matching(args, wanted) if r.name not in recorded]
            res["targets"] = rescue_targets(res, repairs.targets) if judged else None
        report["repairs"] = {"version": repairs.version, "sha256": repairs.sha256, "path": repairs.path,
                             "switch": repairs.switch}
        report["rescue"] = res
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"bench_diagnosis_{args.seed_set}{'_repairs' if args.repairs else ''}{'_short' if shortened else ''}"
    write_json(args.out / f"{name}.json", report)
    table = markdown(report, spec)
    atomic_write_text(args.out / f"{name}.md", table)
    print(table)
    keys = ("flagged_rate", "right_first_rate", "false_alarm_rate", "median_detect_fraction")
    d = scores["detlab"]
    last = {"spec_version": spec.version, "spec_sha256": spec.sha256, "seed_set": args.seed_set, "runs": len(results),
            **{k: d[k] for k in keys}, "notes_rate_on_healthy": scores["notes"]["rate_on_healthy"],
            "overhead": scores["overhead"], "bytes_per_step": report["bytes_per_step"],
            "baselines": {n: {k: s[k] for k in keys} for n, s in scores["baselines"].items()}}
    if repairs:
        res = report["rescue"] or {}
        last["repairs"] = {"version": repairs.version, "sha256": repairs.sha256,
                           **{k: res.get(k) for k in ("rescued_classes", "classes_with_failed_runs",
                                                      "rescued_class_rate", "healthy_change_within_spread")},
                           "classes": {c: {k: v[k] for k in ("runs", "failed", "rescued", "class_rescued")}
                                       for c, v in res.get("classes", {}).items()},
                           "healthy": res.get("healthy"), "targets": res.get("targets")}
    print(json.dumps(last), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="list the spec's runs (with --part: that slicing)")
    mode.add_argument("--replay", action="store_true", help="train nothing: score the recordings of --seed-set")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="only the runs whose name matches a shell pattern (fault-*-s0); the parts slice what is left")
    parser.add_argument("--part", default=None, help="K/N: train the K-th of N deterministic slices of the runs")
    parser.add_argument("--all-parts", action="store_true", help="with --plan --part K/N: list every part")
    parser.add_argument("--seed-set", choices=SEED_SETS, default="tune")
    parser.add_argument("--gpu", action="store_true", help="the GPU-only classes instead of the CPU runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--device", default=None, help="train.device of every run (default: the config's, auto)")
    parser.add_argument("--max-epochs", type=int, default=None, help="shorten every run (a smoke test; never judged)")
    parser.add_argument("--repairs", action="store_true",
                        help="train / score the runs that repairs.yaml measures, with its switch on")
    parser.add_argument("--repairs-file", type=Path, default=REPAIRS_PATH, help=argparse.SUPPRESS)
    parser.add_argument("--set", nargs="*", default=[], help="diagnosis.* overrides for --replay (tuning)")
    parser.add_argument("--recorded-findings", action="store_true",
                        help="with --replay (and --repairs' plan): the findings the runs recorded instead of "
                             "replaying them")
    parser.add_argument("--spec", type=Path, default=SPEC_PATH)
    parser.add_argument("--expected-of", type=Path, default=None, metavar="SPEC",
                        help="with --replay: score with this spec's expected sets (a later version's on --spec's "
                             "recordings); never judged against the targets")
    parser.add_argument("--recordings", type=Path, default=None, help=f"recordings root (default {RECORDINGS})")
    parser.add_argument("--out", type=Path, default=OUT, help="reports and the runs' working folders")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        worker(json.loads(args.worker))
        return 0
    bad = [o for o in args.set if not o.startswith("diagnosis.")]
    if bad:
        parser.error(f"--set takes diagnosis.* overrides only, got {bad}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.repairs and args.set:
        parser.error("--set does not apply with --repairs (the repaired runs replay their own diagnosis block)")
    if args.repairs and args.spec == SPEC_PATH:  # the repairs measure on the spec version they were written for
        args.spec = repairs_spec_path(args.repairs_file)
    spec = load_spec(args.spec)
    repairs = load_repairs(spec, args.repairs_file) if args.repairs else None
    if args.replay:
        return score_recordings(args, spec, repairs)
    if args.plan or not args.part:
        if not args.plan:
            print("nothing trained: --part K/N trains a slice, --replay scores the recordings\n")
        return print_plan(args, spec, repairs)
    return train_part(args, spec, repairs)


if __name__ == "__main__":
    sys.exit(main())
