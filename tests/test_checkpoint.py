import csv

import pytest
import torch

from detlab.runtime.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint, save_checkpoint
from detlab.runtime.fileio import atomic_write_text, write_csv


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "state": {"history": [{"val/miou": 0.5}]}}
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert loaded["state"]["history"][0]["val/miou"] == 0.5
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_atomic_write_keeps_old_file_and_no_temp_when_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("detlab.runtime.fileio.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_csv_has_header_and_empty_cells_for_missing_values(tmp_path):
    write_csv(tmp_path / "m.csv", [{"epoch": 1, "loss": 0.25}, {"epoch": 2}], ["epoch", "loss"])
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert rows == [{"epoch": "1", "loss": "0.25"}, {"epoch": "2", "loss": ""}]


def test_resume_resolution(tmp_path):
    assert find_resume_checkpoint(False, tmp_path) is None
    assert find_resume_checkpoint(True, tmp_path) is None  # nothing yet: start fresh
    last = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(last, {"epoch": 1})
    assert find_resume_checkpoint(True, tmp_path) == last
    assert find_resume_checkpoint("true", tmp_path) == last
    assert find_resume_checkpoint(str(tmp_path), tmp_path / "elsewhere") == last
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_resume_checkpoint(str(tmp_path / "missing"), tmp_path)
