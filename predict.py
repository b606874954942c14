"""Run a checkpoint on your own images: ``python predict.py checkpoint=PATH source=IMAGE|FOLDER|VIDEO [out=DIR] [eval.KEY=...]``,
the same as ``detlab predict checkpoint=PATH source=... ...``.

Writes ``<out>/images/<name>.jpg`` (boxes scoring at least ``eval.score_threshold`` drawn with their
scores; a video source: ``<out>/<name>.mp4``), ``<out>/predictions.json`` (``{image: [{"box": [x1, y1,
x2, y2], "score": s}, ...]}`` in the image's pixels; a video's frames are ``<name>/<frame index>``) and,
with ``save_wider=true``, the WIDER FACE submission layout under ``<out>/wider``. ``backend=onnx`` runs
an ONNX file written by ``scripts/export.py`` in ONNX Runtime (``checkpoint=<file>.onnx``).
Test size, threshold and NMS are the checkpoint's ``eval`` settings; ``eval.*`` keys on the command
line override them, as for ``evaluate.py``. The work is done by ``detlab.predictor``; the command is
``detlab.cli.predict.main``.

Examples:
    python predict.py checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt source=photo.jpg out=preds
    python predict.py checkpoint=PATH source=photos/ eval.input_size=960 eval.score_threshold=0.3 save_wider=true
    python predict.py checkpoint=PATH source=clip.mp4 out=preds
    python predict.py checkpoint=outputs/.../checkpoints/last.onnx backend=onnx source=photo.jpg
    detlab predict checkpoint=PATH source=photo.jpg out=preds   # the installed command, same arguments
"""

import sys

from detlab.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
