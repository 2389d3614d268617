"""Our VisionTransformer -> `model.onnx` (input `pixel_values` (B, 3, S, S) float32, normalised;
output `logits` (B, K)), with a dynamic batch axis, via torch's own exporter (torch.onnx, dynamo).

Needs the `onnx` extra (onnx, onnxscript; onnxruntime to run it): `pip install -e '.[onnx]'`.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from vit_service.host import importable
from vit_service.model import VisionTransformer

ONNX_FILE = "model.onnx"
OPSET = 18  # scaled_dot_product_attention and LayerNormalization export natively
_MAX_BATCH = 4096


class OnnxExportError(ValueError):
    """ONNX export is not possible here; the message says what to install or what failed."""


def export_onnx(model: VisionTransformer, directory: str | os.PathLike[str]) -> Path:
    """Writes `directory/model.onnx`; returns its path."""
    missing = [name for name in ("onnx", "onnxscript") if not importable(name)]
    if missing:
        raise OnnxExportError(f"ONNX export needs {' and '.join(missing)}: pip install -e '.[onnx]' "
                              "(or pip install onnx onnxscript onnxruntime)")
    path = Path(directory) / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    S = model.config.image_size
    example = torch.zeros(2, model.config.in_chans, S, S)  # batch 2: a size-1 example would pin the axis
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    # The exporter prints its progress; the CLI's stdout carries only the model tag.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_shapes=({0: batch},), opset_version=OPSET,
                          dynamo=True, external_data=False)
    return path


__all__ = ["ONNX_FILE", "OnnxExportError", "export_onnx"]
