"""Which code trained a run: ``summary.json``'s ``code`` (detlab.runtime.provenance), with known answers
from a throwaway git repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from detlab.engine.run_state import RunState
from detlab.run_record import RunSummary
from detlab.runtime.provenance import code_version, cpu_info, git_state



def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_names_the_commit_and_whether_tracked_files_changed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD")

    assert git_state(repo / "pkg") == {"git_commit": head, "git_dirty": False}  # from a folder inside it
    (repo / "pkg" / "untracked.py").write_text("")  # untracked files are not the code that ran
    assert git_state(repo / "pkg")["git_dirty"] is False
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    assert git_state(repo / "pkg") == {"git_commit": head, "git_dirty": True}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_outside_any_repository_the_commit_is_unknown_not_guessed(tmp_path):
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}
    # inside a repository that does not track the folder (a wheel in a venv within another project)
    repo = tmp_path / "project"
    (repo / ".venv" / "detlab").mkdir(parents=True)
    (repo / "main.py").write_text("")
    git(repo, "init", "-q")
    git(repo, "add", "main.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    (repo / ".venv" / "detlab" / "__init__.py").write_text("")
    assert git_state(repo / ".venv" / "detlab") == {"git_commit": None, "git_dirty": None}


@pytest.mark.slow  # asks git
def test_the_code_version_names_the_libraries():
    import torch

    version = dict(code_version())  # a copy: code_version() is cached for the process
    assert version["torch"] == torch.__version__ and version["detlab"]
    assert set(version) == {"detlab", "torch", "torchvision", "python", "git_commit", "git_dirty", "cpu"}
    # plain types only: the run state that holds it is saved in weights_only checkpoints
    cpu = version.pop("cpu")
    assert all(type(value) in (str, bool, type(None)) for value in version.values())
    assert all(type(value) in (str, int, type(None)) for value in cpu.values())


def test_a_session_adds_its_code_only_when_it_differs_from_the_one_before():
    state = RunState()
    first = {"detlab": "0.1.0", "git_commit": "a" * 40, "git_dirty": False}
    state.note_code(first)
    state.note_code(dict(first))  # resumed with the same code
    assert state.code == [first]
    other = {**first, "git_commit": "b" * 40}
    state.note_code(other)  # resumed with other code: both are kept, in order
    assert state.code == [first, other]
    assert RunSummary.from_dict(RunSummary(code=state.code).to_dict()).code == [first, other]


def test_cpu_info_reads_the_first_processor_of_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nflags\t\t: fpu avx512f\n\n"
                       "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: Other\n")
    info = cpu_info(cpuinfo)
    assert (info["name"], info["family"], info["model"]) == ("AMD EPYC", "26", "2")
    assert info["cores"] >= 1


def test_cpu_info_without_proc_cpuinfo_still_names_the_machine(tmp_path):
    info = cpu_info(tmp_path / "missing")
    assert info["family"] is None and info["model"] is None and info["cores"] >= 1
    assert info["name"]  # the machine's architecture (platform.machine)
