"""``detlab predict checkpoint=PATH source=IMAGE|FOLDER|VIDEO [out=DIR] [eval.KEY=...]``: run a checkpoint
on your own images (a Hydra app on ``configs/predict.yaml``; ``python predict.py ...`` runs the same).

Writes ``<out>/images/<name>.jpg`` (boxes scoring at least ``eval.score_threshold`` drawn with their
scores; a video source: ``<out>/<name>.mp4``), ``<out>/predictions.json`` (``{image: [{"box": [x1, y1,
x2, y2], "score": s}, ...]}`` in the image's pixels; a video's frames are ``<name>/<frame index>``) and,
with ``save_wider=true``, the WIDER FACE submission layout under ``<out>/wider``. ``backend=onnx`` runs
an ONNX file written by ``detlab export`` in ONNX Runtime (``checkpoint=<file>.onnx``).
Test size, threshold and NMS are the checkpoint's ``eval`` settings; ``eval.*`` keys on the command
line override them, as for ``detlab evaluate``. The work is done by ``detlab.predictor``.

Examples:
    detlab predict checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt source=photo.jpg out=preds
    detlab predict checkpoint=PATH source=photos/ eval.input_size=960 eval.score_threshold=0.3 save_wider=true
    detlab predict checkpoint=PATH source=clip.mp4 out=preds
    detlab predict checkpoint=outputs/.../checkpoints/last.onnx backend=onnx source=photo.jpg
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detlab.cli._hydra import run_hydra_app
from detlab.config import register_configs
from detlab.errors import report_user_errors
from detlab.evaluation import eval_keys_of
from detlab.predictor import predict_images, to_predict_config

register_configs()


def task(raw: DictConfig) -> None:
    """The Hydra task: predict, write the pictures and ``predictions.json``, print a line and the JSON."""
    # A user error (bad argument, source or checkpoint) is one line on stderr and exit code 2.
    with report_user_errors():
        run = to_predict_config(raw)
        out = Path(run.out or HydraConfig.get().runtime.output_dir)
        result = predict_images(run, eval_keys_of(HydraConfig.get().overrides.task), out_dir=out)
    unit = "frames" if result["source"] == "video" else "images"
    print(f"{result['faces']} faces on {result['images']} {unit}; written to {result['out']}")
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``detlab predict [overrides ...]`` (``argv``: the arguments after ``predict``; default: this
    process's). Returns the exit status (2 for a user error)."""
    return run_hydra_app(task, "predict", argv)
