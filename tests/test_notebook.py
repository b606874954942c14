"""notebooks/sweep_analysis.ipynb: committed without outputs, and runs top to bottom on a tiny sweep."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sweep_analysis.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_notebook_runs_on_a_fabricated_sweep(tmp_path, monkeypatch, make_fake_sweep):
    pytest.importorskip("ipykernel")
    nbclient = pytest.importorskip("nbclient")
    sweep = make_fake_sweep(tmp_path / "multirun" / "2024-05-01" / "12-00-00", box_weights=(0.01, 0.1, 1, 5, 10),
                            epochs_planned=3, diverge_at={0.01: 1}, fail=(10,), running={5: 1})
    second = make_fake_sweep(tmp_path / "multirun" / "paper", box_weights=(0.1, 1), epochs_planned=2, diverge_at={})
    monkeypatch.setenv("SWEEP_DIR", f"{sweep}{os.pathsep}{second}")
    monkeypatch.delenv("REPORT_DIR", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 5  # report.png, a per-step grid per sweep, AP against the box weight, mIoU/FP
    assert (sweep / "report.png").is_file() and (sweep / "report.md").is_file()
    text = "".join(out.get("text", "") for out in outputs)
    assert "5 runs: 2 completed, 1 diverged, 1 failed, 0 stopped, 1 running" in text
    markdown = "".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
    assert "**FAILED**" in markdown and "**DIVERGED**" in markdown
