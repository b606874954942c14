#!/usr/bin/env bash
# CUDA, AMP and DistributedDataParallel checks, for a machine with NVIDIA GPUs (none of this runs on
# the CPU-only CI):
#   bash scripts/device_check.sh [OUT_DIR]
# 1. CUDA is visible; 2. two short default-config runs on the GPU, float16 AMP (with the gradient
#    scaler) and float32, both complete with finite losses; 3. the same run under
#    torchrun --nproc_per_node=<GPUs> with NCCL, AMP and SyncBatchNorm, then resumed for one more
#    epoch under torchrun; 4. the final val metrics side by side; 5. evaluate.py scores the AMP
#    checkpoint on the GPU. With one GPU, torchrun runs one process: NCCL takes one process per GPU.
set -euo pipefail
OUT="${1:-${OUT:-/tmp/detlab_device_check}}"
PY="${PYTHON:-python}"  # PYTHON=python3 where that is the interpreter holding torch
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
GPUS="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
COMMON=(+preset=quick train.epochs=3 train.device=cuda dataset.root="$OUT/data" train.sample_grid=0)
for amp in true false; do
  "$PY" train.py "${COMMON[@]}" train.amp=$amp run_dir="$OUT/amp_$amp" \
    hydra.run.dir="$OUT/hydra_$amp" 2>&1 | tail -n 2
done
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" train.py \
  "${COMMON[@]}" train.amp=true train.dist_backend=nccl run_dir="$OUT/ddp" hydra.run.dir="$OUT/hydra_ddp" 2>&1 \
  | grep -E "process group|DistributedDataParallel|status:" || true
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" train.py "${COMMON[@]}" train.epochs=4 \
  train.amp=true train.dist_backend=nccl run_dir="$OUT/ddp" resume=true hydra.run.dir="$OUT/hydra_ddp2" 2>&1 \
  | grep -E "resumed from|status:" || true
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path
from detlab.run_record import RunStatus, read_summary
out = Path(sys.argv[1])
for name in ("amp_true", "amp_false", "ddp"):
    s = read_summary(out / name)
    f = s["final"]
    print(f"{name}: status {s['status']}, device {s['device']}, processes {s.get('processes', 1)}, "
          f"epochs {s['epochs']}, wall {s['wall_time_s']:.0f} s, train loss {f.get('train/loss_total', float('nan')):.3f}, "
          f"val AP50 {f.get('val/ap50', float('nan')):.3f}, recall {f.get('val/recall', float('nan')):.3f}")
    assert s["status"] == RunStatus.COMPLETED, s.get("message")
assert read_summary(out / "ddp")["epochs"] == 4, "the torchrun resume did not continue"
PY
"$PY" evaluate.py checkpoint="$OUT/amp_true/checkpoints/last.pt" device=cuda amp=true output_dir="$OUT/eval" \
  hydra.run.dir="$OUT/hydra_eval" | tail -n 3
