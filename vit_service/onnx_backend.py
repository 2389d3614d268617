"""Batched inference with onnxruntime: the same `predict_proba` contract as `inference.Predictor`.

Reads `model.onnx` (written by `vit-export --onnx`) beside the artifact's manifest; uint8 images
in, float32 probabilities out: softmax(logits / T), T the artifact's temperature (1.0 without one, or
with calibrated=False). Normalisation and softmax run in numpy, the graph holds the
network only, so the ONNX file is the plain model other tools expect.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vit_service.artifact import ModelArtifact
from vit_service.calibration import served_calibration
from vit_service.formats.onnx_export import ONNX_FILE
from vit_service.predictor import check_batch, warm_up


def make_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session for the ONNX file at `path`, `threads` intra-op threads (None:
    onnxruntime's default, one per core)."""
    import onnxruntime as ort  # optional dependency: only hosts that use this backend need it

    options = ort.SessionOptions()
    # No busy-waiting between runs: the decode threads of the same process (or, in a benchmark,
    # the other backend being timed) need the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """The `ImagePredictor` (vit_service/predictor.py) on onnxruntime."""

    def __init__(self, directory: str | os.PathLike[str], threads: int | None = None,
                 path: str | os.PathLike[str] | None = None, precision: str = "fp32", calibrated: bool = True) -> None:
        """`path`: the graph to run (default `directory`/model.onnx; the int8 one, model.int8.onnx,
        with precision="int8"; a cached export for VIT_BACKEND=auto)."""
        path = Path(path) if path else Path(directory) / ONNX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ONNX model (export with vit-export --onnx)")
        self.path = path
        self.artifact = ModelArtifact.read(directory)
        self.calibrated = calibrated
        self.temperature = np.float32(self.artifact.temperature if calibrated else 1.0)
        self.preprocessing = self.artifact.preprocessing
        S = self.preprocessing.image_size
        self.input_shape = (3, S, S)
        self.session = make_session(path, threads)
        # mean/std in 0..255 units, shaped to broadcast over (B, 3, S, S)
        self._mean = np.asarray(self.preprocessing.mean, np.float32).reshape(1, 3, 1, 1) * 255.0
        self._std = np.asarray(self.preprocessing.std, np.float32).reshape(1, 3, 1, 1) * 255.0
        self.device, self.precision = "cpu", precision
        self.threads = threads

    @property
    def num_classes(self) -> int:
        return len(self.artifact.class_names)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) uint8 images -> (B, num_classes) float32 probabilities, softmax(logits / T)."""
        x = np.asarray(images)
        check_batch(str(x.dtype), x.shape, self.input_shape)
        if x.shape[0] == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        pixels = (x.astype(np.float32) - self._mean) / self._std  # (B, 3, S, S)
        logits = self.session.run(["logits"], {"pixel_values": pixels})[0] / self.temperature  # (B, K)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def warmup(self, max_batch_size: int) -> float:
        start = time.perf_counter()
        warm_up(self.predict_proba, self.input_shape, max_batch_size)
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"device": "cpu", "precision": self.precision, "backend": "onnxruntime",
                                "onnx_file": self.path.name, "onnxruntime_threads": self.threads}
        if self.precision == "int8":  # how it was measured against fp32 at export (vit_artifact.json)
            info["int8"] = self.artifact.int8
        return {**info, **served_calibration(self.artifact.calibration, self.calibrated, self.precision)}


__all__ = ["OnnxPredictor", "make_session"]
