#!/usr/bin/env python
"""Export a checkpoint: ``python scripts/export.py checkpoint=PATH [format=onnx|torchscript] [input_size=[W,H]]``

ONNX (``pip install -e ".[export]"``): dynamic batch; dynamic height and width unless ``input_size`` is
given; the training config is stored in the file, so ``python predict.py checkpoint=<file>.onnx
backend=onnx source=...`` runs it. The graph returns the raw head outputs; the post-processing (softmax,
box decoding against the anchors, NMS) is the documented step in docs/export.md. Before writing, the
export is compared with PyTorch on random images (``check=true``) and nothing is written if they differ
by more than 1e-4. The work is done by ``detlab.export``.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from detlab.config import register_configs
from detlab.errors import report_user_errors
from detlab.export import describe, export_checkpoint, to_export_config

register_configs()


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
def main(raw: DictConfig) -> None:
    with report_user_errors():
        result = export_checkpoint(to_export_config(raw))
    print(describe(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
