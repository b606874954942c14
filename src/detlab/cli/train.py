"""``detlab train [group=option ...] [key=value ...]``: train an SSD detector (a Hydra app; ``python
train.py ...`` runs the same).

Examples:
    detlab train                                      # default: ssd_slim on the embedded synthetic set
    detlab train loss.box_weight=0.05                 # one of the paper's loss-weight pairs
    detlab train -m +experiment=box_weight_sweep      # the nine-run sweep
    detlab train -m +experiment=weight_search         # Optuna searches box weight and negative ratio
    detlab train resume=outputs/2026-11-23/20-00-00   # continue an interrupted or killed run
    detlab train --cfg job                            # the composed config, nothing run
    torchrun --nproc_per_node=2 train.py              # DistributedDataParallel over 2 processes

A user error is one line on stderr and exit status 2; a run ended by SIGINT / SIGTERM exits 130 / 143
(checkpoint and record written). Hydra's job name stays ``train`` (``train.log``, run folders under
``outputs/`` as before).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from detlab.cli._hydra import run_hydra_app
from detlab.config import Config, load_saved_config, register_configs, to_config
from detlab.errors import ConfigError, UserError, debug_requested, one_line, report_user_errors
from detlab.resume import resumed_config
from detlab.run_record import RunPaths, RunStatus, read_summary, record_failure
from detlab.runtime.interrupt import exit_on_interrupt

log = logging.getLogger("train")
register_configs()


def resumed_run_dir(resume: object) -> str | None:
    """``resume=<run dir or checkpoint>`` continues that run in its own directory."""
    if isinstance(resume, bool) or resume is None or str(resume).lower() in ("", "true", "false"):
        return None
    path = Path(str(resume)).expanduser()
    return str(path if path.is_dir() else path.parent.parent)


def config_of_run(run_dir: Path, resume: object) -> Config:
    """The saved, validated config of the run being resumed (so it continues as it started)."""
    saved = RunPaths(run_dir).config
    if not saved.is_file():
        raise ConfigError(f"config error: resume={resume}: {saved} not found; is {run_dir} a run directory?")
    cfg = load_saved_config(OmegaConf.load(saved))
    cfg.resume = str(resume)
    return cfg


def original_overrides(run_dir: Path) -> list[str] | None:
    summary = read_summary(run_dir)
    return summary.get("overrides") if summary is not None else None


def compose_here(overrides: list[str]) -> Config:
    """train.py's config composed with ``overrides`` inside this Hydra app, typed and validated."""
    from hydra import compose
    from hydra.errors import HydraException

    try:
        return to_config(compose(config_name="config", overrides=overrides))
    except HydraException as error:
        raise ConfigError(f"config error: {one_line(error).removeprefix('error: ')}") from None


def requeued_job(run_dir: Path, resume: object) -> bool:
    """A submitit job started again after a preemption or its time limit (submitit requeues it with
    the same overrides): it continues its run when the run folder's record says ``interrupted`` (this
    process's signal handling wrote it), or SLURM counts a restart (the job was killed before it
    could), and a checkpoint is there."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or resumed_run_dir(resume) or str(resume).lower() == "true":
        return False
    paths = RunPaths(run_dir)
    summary = read_summary(run_dir) or {}
    restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    return paths.last.is_file() and (summary.get("status") == RunStatus.INTERRUPTED or restarted)


def quiet_other_ranks(argv: list[str]) -> list[str]:
    """Under torchrun, ranks other than 0 get no Hydra folder of their own (rank 0 chooses the run
    folder for all; the others log to the console) and show only errors."""
    if int(os.environ.get("RANK", "0")) == 0:  # read before torch is imported (it takes seconds)
        return argv
    return [*argv, "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout",
            "hydra.job_logging.root.level=ERROR"]


def threads_per_job(hydra_cfg) -> int | None:
    """Cores divided by the launcher's parallel jobs, so parallel runs don't oversubscribe the CPU."""
    n_jobs = hydra_cfg.launcher.get("n_jobs") if "launcher" in hydra_cfg else None
    if not n_jobs or n_jobs <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // int(n_jobs))


def task(raw: DictConfig) -> float | None:
    """The Hydra task: one run, or one run of a sweep (``-m``); returns the objective for a sweeper."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and "WORLD_SIZE" in os.environ:
        with report_user_errors():
            raise ConfigError("config error: -m (a sweep) under torchrun: torchrun trains one run over several "
                              "processes; sweep with python train.py -m (hydra/launcher=slurm for a cluster)")
    if hydra_cfg.mode != RunMode.MULTIRUN:
        # A user error (bad value, annotation, image, checkpoint, busy run folder) is one line on
        # stderr and exit code 2; DETLAB_DEBUG=1 or HYDRA_FULL_ERROR=1 shows the traceback. A run
        # ended by SIGINT / SIGTERM (checkpoint and record written) is one line and exit code 130 / 143.
        with exit_on_interrupt(), report_user_errors():
            return run(raw, hydra_cfg, multirun=False)
    try:
        # An interrupted run ends the sweep (the process was asked to end) as it ends a single run; in a
        # submitit job the signal then goes on to submitit, which requeues the job.
        with exit_on_interrupt():
            return run(raw, hydra_cfg, multirun=True)
    except Exception as error:  # noqa: BLE001 - in a sweep a failing run is a result, not a reason to stop
        from detlab.runtime.fileio import LockedError

        run_dir = raw.get("run_dir") or hydra_cfg.runtime.output_dir
        message = one_line(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        if not isinstance(error, LockedError):  # never write into a folder another process trains in
            record_failure(run_dir, message, list(hydra_cfg.overrides.task))
        if isinstance(error, UserError) and not debug_requested():
            log.error("run %s failed: %s; the sweep goes on", run_dir, message)
        else:
            log.exception("run %s failed; the sweep goes on", run_dir)
        return None


def run(raw: DictConfig, hydra_cfg, multirun: bool) -> float | None:
    """Validate the config (before anything is built or written), then train one run."""
    cfg = to_config(raw)  # before torch is imported (it takes seconds): a bad value fails at once
    overrides = list(hydra_cfg.overrides.task)
    run_dir = cfg.run_dir or resumed_run_dir(cfg.resume) or hydra_cfg.runtime.output_dir
    if multirun and requeued_job(Path(run_dir), cfg.resume):
        log.info("requeued job: continuing the interrupted run in %s", run_dir)
        cfg.resume = True
    paths = RunPaths(Path(run_dir))
    resuming = resumed_run_dir(cfg.resume) or (str(cfg.resume).lower() == "true" and paths.last.is_file()
                                               and paths.config.is_file())
    if resuming:  # the run's own config; only the overrides SAFE_ON_RESUME lists may change it
        saved = config_of_run(Path(run_dir), cfg.resume)
        original = original_overrides(Path(run_dir))
        cfg, overrides = resumed_config(saved, compose_here, original or [], overrides, what=str(cfg.resume))
        cfg.resume = saved.resume
    if cfg.train.torch_threads is None and multirun:
        cfg.train.torch_threads = threads_per_job(hydra_cfg)
    from detlab.runtime import distributed

    if distributed.launched_by_torchrun():
        import torch

        distributed.init_from_environment(cfg.train.dist_backend, cfg.train.device, cfg.train.batch_size)
        run_dir = distributed.broadcast_object(run_dir)  # rank 0's folder: Hydra's clock differs per process
        if cfg.train.torch_threads is None and (cfg.train.device == "cpu" or not torch.cuda.is_available()):
            cfg.train.torch_threads = max(1, (os.cpu_count() or 1) // distributed.local_world_size())

    from detlab.engine.trainer import train

    try:
        summary = train(cfg, run_dir, overrides)
    except BaseException:
        distributed.shutdown(wait_for_others=False)
        raise
    distributed.shutdown()
    log.debug("status: %s; run directory: %s", summary["status"], run_dir)  # the console table said both
    if summary["status"] != RunStatus.COMPLETED and not multirun:
        log.warning("run ended with status %s: %s", summary["status"], summary["message"])
    value = summary.get("final", {}).get(cfg.train.objective)  # what a sweeper (Optuna) optimises
    return float(value) if value is not None else None


def main(argv: list[str] | None = None) -> int:
    """``detlab train [overrides ...]`` (``argv``: the arguments after ``train``; default: this
    process's). Returns the exit status: 0, 2 for a user error, 130 / 143 for an interrupted run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_hydra_app(task, "config", quiet_other_ranks(argv))
