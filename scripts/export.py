#!/usr/bin/env python
"""Export a checkpoint: ``python scripts/export.py checkpoint=PATH [format=onnx|torchscript] [input_size=[W,H]]``,
the same as ``detlab export checkpoint=PATH ...``.

ONNX (``pip install -e ".[export]"``): dynamic batch; dynamic height and width unless ``input_size`` is
given; the training config is stored in the file, so ``python predict.py checkpoint=<file>.onnx
backend=onnx source=...`` runs it. The graph returns the raw head outputs; the post-processing (softmax,
box decoding against the anchors, NMS) is the documented step in docs/export.md. Before writing, the
export is compared with PyTorch on random images (``check=true``) and nothing is written if they differ
by more than 1e-4. The work is done by ``detlab.export``; the command is ``detlab.cli.export.main``.

Examples:
    python scripts/export.py checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt
    python scripts/export.py checkpoint=PATH input_size=[320,256] format=onnx
    detlab export checkpoint=PATH format=torchscript   # the installed command, same arguments
"""

import sys

from detlab.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
