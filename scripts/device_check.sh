#!/usr/bin/env bash
# CUDA and AMP checks, for a machine with an NVIDIA GPU (none of this runs on the CPU-only CI):
#   bash scripts/device_check.sh [OUT_DIR]
# 1. CUDA is visible; 2. two short default-config runs on the GPU, float16 AMP (with the gradient
# scaler) and float32, both complete with finite losses; 3. their final val metrics are printed side
# by side; 4. evaluate.py scores the AMP checkpoint on the GPU.
set -euo pipefail
OUT="${1:-${OUT:-/tmp/detlab_device_check}}"
PY="${PYTHON:-python}"  # PYTHON=python3 where that is the interpreter holding torch
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
for amp in true false; do
  "$PY" train.py +preset=quick train.epochs=3 train.device=cuda train.amp=$amp run_dir="$OUT/amp_$amp" 2>&1 | tail -n 2
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for amp in ("true", "false"):
    s = json.loads((out / f"amp_{amp}" / "summary.json").read_text())
    f = s["final"]
    print(f"amp={amp}: status {s['status']}, device {s['device']}, wall {s['wall_time_s']:.0f} s, "
          f"train loss {f.get('train/loss_total', float('nan')):.3f}, val AP50 {f.get('val/ap50', float('nan')):.3f}")
    assert s["status"] == "completed", s.get("message")
PY
"$PY" evaluate.py checkpoint="$OUT/amp_true/checkpoints/last.pt" device=cuda amp=true output_dir="$OUT/eval" | tail -n 3
