"""dataset.num_workers=null picks the data-loader workers for the machine; a number is kept as given."""

from __future__ import annotations

import pytest
import torch

from detlab.config import compose_config
from detlab.runtime.device import loader_workers


def test_a_given_number_is_kept():
    assert loader_workers(3, "cpu", cores=2) == 3
    assert loader_workers(0, "cuda", cores=64) == 0


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (4, 1), (8, 2), (16, 4), (64, 4)])
def test_cpu_training_keeps_the_cores_for_the_network(cores, workers, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None, "cpu", cores=cores) == workers


@pytest.mark.parametrize("cores, workers", [(2, 0), (4, 3), (16, 8)])
def test_cuda_training_feeds_the_gpu_from_all_but_one_core(cores, workers, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader_workers(None, "cuda", cores=cores) == workers
    assert loader_workers(None, "auto", cores=cores) == workers
    assert loader_workers(None, "cpu", cores=cores) == min(4, cores // 4)  # asked for the CPU on a GPU machine


def test_torchrun_processes_share_the_node_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(None, "cuda", cores=16) == 3  # 4 cores each, one left to drive the GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(None, "cuda", cores=16) == 0  # 2 cores each


def test_the_default_is_null_and_a_negative_count_is_refused():
    assert compose_config().dataset.num_workers is None
    with pytest.raises(Exception, match="dataset.num_workers"):
        compose_config(overrides=["dataset.num_workers=-1"])
