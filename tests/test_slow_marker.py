"""The quick loop stays quick: tests/conftest.py fails a test that starts a subprocess or trains a run
unless it is marked slow (``python -m pytest -m "not slow"`` leaves those out)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

BODY = '''
import subprocess, sys
import pytest

{marker}
def test_starts_a_subprocess():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

{marker}
def test_trains(tmp_path):
    from detlab.config import Config
    from detlab.engine.trainer import Trainer
    Trainer(Config(), tmp_path).run()  # refused before it builds anything when unmarked
'''


@pytest.mark.slow  # the inner session's subprocess must run when marked
@pytest.mark.parametrize("marker, outcome", [("", {"failed": 2}), ("@pytest.mark.slow", {"passed": 1})])
def test_unmarked_slow_work_fails_and_marked_work_runs(pytester, marker, outcome):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner=BODY.format(marker=marker))
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    args = ["-p", "no:cacheprovider"] + ([] if not marker else ["-k", "subprocess"])
    result = pytester.runpytest_inprocess(*args)
    result.assert_outcomes(**outcome)
    if not marker:
        result.stdout.fnmatch_lines(["*test_starts_a_subprocess starts a subprocess: mark it @pytest.mark.slow*",
                                     "*test_trains trains a run: mark it @pytest.mark.slow*"])
