"""Run a checkpoint on your own images: ``python predict.py checkpoint=PATH source=IMAGE|FOLDER|VIDEO [out=DIR] [eval.KEY=...]``

Writes ``<out>/images/<name>.jpg`` (boxes scoring at least ``eval.score_threshold`` drawn with their
scores; a video source: ``<out>/<name>.mp4``), ``<out>/predictions.json`` (``{image: [{"box": [x1, y1,
x2, y2], "score": s}, ...]}`` in the image's pixels; a video's frames are ``<name>/<frame index>``) and,
with ``save_wider=true``, the WIDER FACE submission layout under ``<out>/wider``. ``backend=onnx`` runs
an ONNX file written by ``scripts/export.py`` in ONNX Runtime (``checkpoint=<file>.onnx``).
Test size, threshold and NMS are the checkpoint's ``eval`` settings; ``eval.*`` keys on the command
line override them, as for ``evaluate.py``. The work is done by ``detlab.predictor``.

Examples:
    python predict.py checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt source=photo.jpg out=preds
    python predict.py checkpoint=PATH source=photos/ eval.input_size=960 eval.score_threshold=0.3 save_wider=true
    python predict.py checkpoint=PATH source=clip.mp4 out=preds
    python predict.py checkpoint=outputs/.../checkpoints/last.onnx backend=onnx source=photo.jpg
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detlab.config import register_configs
from detlab.errors import report_user_errors
from detlab.evaluation import eval_keys_of
from detlab.predictor import predict_images, to_predict_config

register_configs()


@hydra.main(config_path="configs", config_name="predict", version_base="1.3")
def main(raw: DictConfig) -> None:
    # A user error (bad argument, source or checkpoint) is one line on stderr and exit code 2.
    with report_user_errors():
        run = to_predict_config(raw)
        out = Path(run.out or HydraConfig.get().runtime.output_dir)
        result = predict_images(run, eval_keys_of(HydraConfig.get().overrides.task), out_dir=out)
    unit = "frames" if result["source"] == "video" else "images"
    print(f"{result['faces']} faces on {result['images']} {unit}; written to {result['out']}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
