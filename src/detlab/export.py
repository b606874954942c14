"""Export a trained checkpoint to ONNX or TorchScript: the library behind ``scripts/export.py``.

The exported graph is the network: ``images [B, 3, H, W]`` (RGB, ImageNet-normalised, as
``detlab.prediction.OriginalSizeImages`` prepares them) -> ``cls_logits [B, A, C]`` and
``bbox_regression [B, A, 4]`` in the anchor order of ``detlab.model.anchors``. The batch is always
dynamic; the input size is dynamic (``input_size: null``) or fixed (``input_size: [W, H]``).

Post-processing is a documented step outside the graph, because the anchors depend on the input
size: ``SSD.postprocess`` (softmax face score, SSD delta decoding against the anchors for that size
with variances ``model.variances``, top-``pre_nms_top_k``, ``score_floor``, NMS at ``nms_iou``,
``max_detections``). ``detlab.onnx_runtime`` runs it behind ONNX Runtime, so ``predict.py backend=onnx``
takes the same prediction path as PyTorch; only the network's forward differs.

The ONNX file carries the training config (metadata ``detlab.config``), so it is all ``predict.py``
needs. TorchScript (``torch.jit.trace``) is traced at one input size and carries no config.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from detlab.config import ExportConfig, typed_entry_config
from detlab.errors import UserError
from detlab.onnx_runtime import CONFIG_KEY, INPUT_NAME, OUTPUT_NAMES, onnx_session

FORMATS = ("onnx", "torchscript")
# The largest difference to eager PyTorch an export may show on its check images (raw head outputs,
# relative to their largest magnitude when that exceeds 1).
PARITY_TOLERANCE = 1e-4


class ExportError(UserError, ValueError):
    """A bad export.py argument or an export that does not match PyTorch; the message says which."""


class RawHeads(nn.Module):
    """The exported graph: backbone and heads, without ``SSD.forward``'s input-size check (a traced
    check would be frozen at the traced size and break the dynamic-size export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        outputs = self.model.head(self.model.backbone(images))
        return outputs["cls_logits"], outputs["bbox_regression"]


def _check_config(run: ExportConfig) -> None:
    if run.format not in FORMATS:
        raise ExportError(f"format={run.format!r}: expected one of {', '.join(FORMATS)}")
    if run.input_size is not None and (len(run.input_size) != 2 or min(run.input_size) < 32):
        raise ExportError(f"input_size={list(run.input_size)}: expected null or [W, H], each at least 32")
    if run.format == "onnx" and not 13 <= run.opset <= 20:
        raise ExportError(f"opset={run.opset}: expected 13 to 20 (the TorchScript-based ONNX exporter's range)")


def default_output(checkpoint: Path | str, fmt: str) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + (".onnx" if fmt == "onnx" else ".torchscript.pt"))


def _require(module: str, extra: str = "export") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install -e \".[{extra}]\"") from None


def export_checkpoint(run: ExportConfig) -> dict[str, Any]:
    """Write ``run.checkpoint``'s network as ``run.format``; returns ``{"out", "format", "input_size",
    "max_difference"}`` (the check's largest difference to eager PyTorch, see ``_max_difference``; None
    without ``check``)."""
    from detlab.runtime.checkpoint import load_weights
    from detlab.trained import load_trained
    from detlab.runtime.fileio import atomic_write_bytes
    from detlab.model import architecture_config, build_model

    _check_config(run)
    trained, checkpoint = load_trained(run.checkpoint)
    width, height = run.input_size or (trained.model.input_width, trained.model.input_height)
    model = build_model(replace(architecture_config(trained.model), input_width=width, input_height=height))
    load_weights(model, checkpoint["model"], f"checkpoint {run.checkpoint}")
    graph = RawHeads(model).eval()
    example = torch.zeros(2, 3, height, width)
    out = Path(run.out) if run.out else default_output(run.checkpoint, run.format)

    if run.format == "onnx":
        data = _onnx_bytes(graph, example, run, OmegaConf.to_container(OmegaConf.structured(trained)))
        # a dynamic-size export is also checked at a size it was not traced at
        sizes = [(width, height)] if run.input_size else [(width, height), (width + 64, height - 32)]
        difference = check_onnx(data, graph, sizes) if run.check else None
    else:
        import warnings

        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            # PyTorch marks torch.jit deprecated (FutureWarning) but still ships it; docs/export.md says so
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.trace(graph, example, check_trace=False), buffer)
            data = buffer.getvalue()
            loaded = torch.jit.load(io.BytesIO(data)) if run.check else None
        difference = _max_difference(loaded, graph, [(width, height)]) if loaded is not None else None
    if difference is not None and difference > PARITY_TOLERANCE:
        raise ExportError(f"the {run.format} export differs from PyTorch by {difference:.2e} (> {PARITY_TOLERANCE}); "
                          f"nothing written")
    atomic_write_bytes(out, data)
    size = [width, height] if run.input_size or run.format == "torchscript" else "dynamic"
    return {"out": str(out), "format": run.format, "input_size": size, "max_difference": difference}


def _onnx_bytes(graph: RawHeads, example: Tensor, run: ExportConfig, config: dict[str, Any]) -> bytes:
    import warnings

    onnx = _require("onnx")
    names = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=run.opset)
    with warnings.catch_warnings():
        # the TorchScript-based exporter warns that it is deprecated and that traced shapes are Python
        # ints: they are traced as shape ops here, and the check below compares at an untraced size
        warnings.simplefilter("ignore")
        if run.dynamo:
            import logging

            _require("onnxscript")
            for name in ("onnx_ir", "onnxscript"):  # their passes log at INFO, once per optimisation step
                logging.getLogger(name).setLevel(logging.WARNING)
            batch = torch.export.Dim("batch", min=1)
            axes = {0: batch} if run.input_size else {0: batch, 2: torch.export.Dim("height", min=32),
                                                       3: torch.export.Dim("width", min=32)}
            program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=(axes,), **names)
            proto = program.model_proto
        else:
            axes = {0: "batch"} if run.input_size else {0: "batch", 2: "height", 3: "width"}
            buffer = io.BytesIO()
            torch.onnx.export(graph, (example,), buffer, dynamo=False, **names, dynamic_axes={
                INPUT_NAME: axes, **{name: {0: "batch", 1: "anchors"} for name in OUTPUT_NAMES}})
            proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, json.dumps(config)
    proto.producer_name = "detlab"
    return proto.SerializeToString()


def check_onnx(data: bytes, graph: nn.Module, sizes: Sequence[tuple[int, int]]) -> float:
    session = onnx_session(data)
    return _max_difference(lambda x: session.run(None, {INPUT_NAME: x.numpy()}), graph, sizes)


def _max_difference(run_exported: Any, graph: nn.Module, sizes: Sequence[tuple[int, int]]) -> float:
    """Largest difference of the raw outputs on a batch of 3 random images (seeded) per size, relative to
    the output's largest magnitude where that exceeds 1 (float32 sums of many terms round in relation
    to their size)."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for width, height in sizes:
        images = torch.randn(3, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = graph(images)
            exported = run_exported(images)
        worst = max(worst, *(float((torch.as_tensor(a) - b).abs().max()) / max(1.0, float(b.abs().max()))
                             for a, b in zip(exported, expected)))
    return worst


def to_export_config(raw: Any) -> ExportConfig:
    """Hydra's composed ``export.yaml`` as a typed ``ExportConfig`` (a wrong type: one clear error)."""
    return typed_entry_config(raw, ExportConfig, ExportError)


def describe(result: dict[str, Any]) -> str:
    diff = result["max_difference"]
    check = f", largest difference to PyTorch {diff:.1e}" if diff is not None else ""
    size = result["input_size"]
    size = "dynamic size" if size == "dynamic" else f"{size[0]}x{size[1]}"
    return f"{result['format']} ({size}, dynamic batch{check}) written to {result['out']}"

