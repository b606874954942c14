"""``detlab export checkpoint=PATH [format=onnx|torchscript] [input_size=[W,H]]``: export a checkpoint (a
Hydra app on ``configs/export.yaml``; ``python scripts/export.py ...`` runs the same).

ONNX (``pip install -e ".[export]"``): dynamic batch; dynamic height and width unless ``input_size`` is
given; the training config is stored in the file, so ``detlab predict checkpoint=<file>.onnx
backend=onnx source=...`` runs it. The graph returns the raw head outputs; the post-processing (softmax,
box decoding against the anchors, NMS) is the documented step in docs/export.md. Before writing, the
export is compared with PyTorch on random images (``check=true``) and nothing is written if they differ
by more than 1e-4. The work is done by ``detlab.export``.

Examples:
    detlab export checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt   # best.onnx beside it
    detlab export checkpoint=PATH input_size=[320,256]                         # a fixed input size
    detlab export checkpoint=PATH format=torchscript                           # traced at the training size
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from detlab.cli._hydra import run_hydra_app
from detlab.config import register_configs
from detlab.errors import report_user_errors
from detlab.export import describe, export_checkpoint, to_export_config

register_configs()


def task(raw: DictConfig) -> None:
    """The Hydra task: export, print a line and the JSON."""
    with report_user_errors():
        result = export_checkpoint(to_export_config(raw))
    print(describe(result))
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``detlab export [overrides ...]`` (``argv``: the arguments after ``export``; default: this
    process's). Returns the exit status (2 for a user error)."""
    return run_hydra_app(task, "export", argv)
