"""The contract every inference backend keeps, and the parts they share.

A predictor turns a (B, 3, S, S) uint8 batch (resized and cropped, not normalised) into
(B, num_classes) float32 softmax probabilities. `inference.Predictor` (torch),
`onnx_backend.OnnxPredictor` (onnxruntime) and `backend.Fastest` (the fastest of those)
keep it. Serving uses this contract, plus the torch model itself for /explain where the
predictor has one (serving/model_handle.make_explainer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vit_service.artifact import ModelArtifact
from vit_service.preprocessing import Preprocessing

@runtime_checkable
class ImagePredictor(Protocol):
    artifact: ModelArtifact
    preprocessing: Preprocessing
    input_shape: tuple[int, int, int]  # (3, S, S)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) uint8 -> (B, num_classes) float32 probabilities; ValueError on another shape."""

    def warmup(self, max_batch_size: int) -> float:
        """Runs the first batch sizes the server will see; returns the seconds it took."""

    def describe(self) -> dict[str, Any]:
        """backend, device, precision and the like, for /model_info."""


def check_batch(dtype: str, shape: tuple[int, ...], input_shape: tuple[int, int, int]) -> None:
    """Raises ValueError unless (dtype, shape) is a uint8 batch of `input_shape` images."""
    if dtype != "uint8" or len(shape) != 4 or tuple(shape[1:]) != input_shape:
        raise ValueError(f"expected a uint8 batch of shape (B, {', '.join(map(str, input_shape))}), "
                         f"got {dtype} {tuple(shape)}")


def warm_up(predict_proba: Callable[[np.ndarray], Any], input_shape: tuple[int, int, int], max_batch_size: int) -> None:
    """One call at each batch size the server sees first: 1, 2 and the largest."""
    for n in sorted({1, 2, max_batch_size}):
        predict_proba(np.zeros((n, *input_shape), dtype=np.uint8))
