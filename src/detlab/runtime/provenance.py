"""Which code trained a run: the package and library versions, the git commit of the source tree when
detlab runs from a checkout (``pip install -e .``), and the CPU. Kept in ``summary.json``'s ``code`` so
that a figure read from a run folder can be traced to what produced it: the same run gives the same
figures on one machine and slightly different ones on another CPU model, whose float kernels differ."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision

from detlab import __version__

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/detlab


def _git(args: list[str], cwd: Path) -> Optional[str]:
    """``git <args>``'s output in ``cwd``, or None when git is missing, ``cwd`` is in no repository, or
    git does not answer within 5 seconds (the longest a run's start waits on this)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(source_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """``git_commit`` (40 hex digits) and ``git_dirty`` (tracked files changed since that commit) of the
    repository holding ``source_dir``; both None when it is in none (an installed wheel), or when that
    repository does not track ``source_dir``'s files (a wheel installed in a virtual environment that lies
    inside some other project's repository)."""
    commit = _git(["rev-parse", "HEAD"], source_dir)
    if not commit or not _git(["ls-files", "."], source_dir):
        return {"git_commit": None, "git_dirty": None}
    changes = _git(["status", "--porcelain", "--untracked-files=no"], source_dir)
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU: ``name``, and on Linux its ``family`` and ``model`` numbers (two CPUs of one name may
    differ in them, and in the kernels torch picks), the instruction set torch's kernels use
    (``capability``) and the cores this process may use."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not line.strip():
                break  # the first processor's block is enough
            if key in ("model name", "cpu family", "model"):
                fields[key] = value.strip()
    except OSError:
        pass
    try:
        capability: Optional[str] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # platform.machine(), not platform.processor(): the latter starts a subprocess (uname -p) on Linux
    return {"name": fields.get("model name") or platform.machine() or None,
            "family": fields.get("cpu family"), "model": fields.get("model"), "capability": capability,
            "cores": cores}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """This process's code: detlab, torch, torchvision and Python versions, ``git_state()`` and
    ``cpu_info()`` (as ``cpu``). Read once per process (the source does not change under a running
    process's imports)."""
    # str(): torch.__version__ is a TorchVersion, which a weights_only checkpoint load refuses
    return {"detlab": str(__version__), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), **git_state(), "cpu": cpu_info()}
