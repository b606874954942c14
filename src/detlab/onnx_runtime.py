"""Run an exported ONNX model in ONNX Runtime: the backend behind ``predict.py backend=onnx``.

The file contract is the exporter's (``detlab.export``): one input ``images [B, 3, H, W]`` (RGB,
ImageNet-normalised, as ``detlab.prediction.OriginalSizeImages`` prepares them), two outputs
``cls_logits [B, A, C]`` and ``bbox_regression [B, A, 4]``, and the training config as metadata
(``detlab.config``), so the file is all a predictor needs. ``OnnxSSD`` is an SSD whose forward runs in
ONNX Runtime while its anchors and ``postprocess`` are the PyTorch model's; ``OnnxModelsBySize`` builds
one per input size, so the ONNX backend takes the same prediction path (``detlab.prediction``) as
PyTorch and only the network's forward differs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from detlab.config import Config, load_saved_config
from detlab.errors import UserError
from detlab.prediction import ModelsBySize

CONFIG_KEY = "detlab.config"
INPUT_NAME, OUTPUT_NAMES = "images", ("cls_logits", "bbox_regression")


class OnnxModelError(UserError, ValueError):
    """An ONNX file ONNX Runtime cannot run as a detlab model (unreadable, foreign, wrong input size)."""


def import_onnxruntime() -> Any:
    """``onnxruntime``, or a one-line error saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxModelError('onnxruntime is not installed: pip install -e ".[export]"') from None
    return onnxruntime


def onnx_session(model: bytes | str | Path, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's thread count)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    # After a run ONNX Runtime's idle threads spin for a while; here the post-processing (PyTorch) runs
    # right after and competed with them: 16.5 -> 9.x ms per image for ssd_slim at 320x256, 2 threads
    # (scripts/bench_inference.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_exported(path: Path | str, threads: Optional[int] = None) -> tuple[Config, Any]:
    """``(training config, ONNX Runtime session)`` of a file written by ``export.py format=onnx``."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"checkpoint={path}: no such file")
    try:
        session = onnx_session(path, threads)
    except OnnxModelError:
        raise
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise OnnxModelError(f"checkpoint={path}: not an ONNX model ONNX Runtime can read "
                             f"({str(error).splitlines()[0]})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if CONFIG_KEY not in meta:
        raise OnnxModelError(f"checkpoint={path}: an ONNX model without detlab's config; export it with scripts/export.py")
    return load_saved_config(json.loads(meta[CONFIG_KEY])), session


class OnnxSSD(nn.Module):
    """An SSD whose forward runs in ONNX Runtime; the anchors and ``postprocess`` are the SSD's."""

    def __init__(self, session: Any, ssd: nn.Module) -> None:
        super().__init__()
        self.session = session
        self.ssd = ssd

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        cls_logits, bbox_regression = self.session.run(None, {INPUT_NAME: images.detach().cpu().float().numpy()})
        return {"cls_logits": torch.from_numpy(cls_logits), "bbox_regression": torch.from_numpy(bbox_regression)}

    def postprocess(self, *args: Any, **kwargs: Any) -> list[dict[str, Tensor]]:
        return self.ssd.postprocess(*args, **kwargs)


class OnnxModelsBySize(ModelsBySize):
    """``ModelsBySize`` for an exported ONNX model: one session, an ``OnnxSSD`` per input size."""

    def __init__(self, path: Path | str, session: Any, model_cfg: Any, cache_size: int = 32) -> None:
        super().__init__(model_cfg, {}, torch.device("cpu"), cache_size)
        self.path = Path(path)
        self.session = session
        shape = session.get_inputs()[0].shape  # [batch, 3, H, W]; dims are names where dynamic
        self.fixed_size: Optional[Sequence[int]] = (shape[3], shape[2]) if all(isinstance(d, int) for d in shape[2:]) else None

    def build(self, width: int, height: int) -> nn.Module:
        from detlab.model import build_model

        if self.fixed_size is not None and (width, height) != tuple(self.fixed_size):
            w, h = self.fixed_size
            raise OnnxModelError(f"{self.path} takes {w}x{h} images only, this input is {width}x{height}: set "
                                 f"eval.input_size=[{w},{h}] or export with input_size=null (dynamic)")
        return OnnxSSD(self.session, build_model(replace(self.model_cfg, input_width=width, input_height=height))).eval()
