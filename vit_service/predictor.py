"""The contract every inference backend keeps, and the parts they share.

A predictor turns a (B, 3, S, S) uint8 batch (resized and cropped, not normalised) into
(B, num_classes) float32 softmax probabilities. `inference.Predictor` (torch),
`onnx_backend.OnnxPredictor` (onnxruntime) and `backend.Fastest` (the fastest of those)
keep it; the serving layer uses nothing else of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vit_service.artifact import ModelArtifact
from vit_service.host import MIN_GAIN, is_faster
from vit_service.preprocessing import Preprocessing

# A faster alternative (bf16 autocast on a CPU, onnxruntime against torch, int8) is taken only when
# it is measured at least this much faster: below it, timing noise decides. The rule and the timing
# helper live in vit_service/host.py, shared with training's `precision: auto`.
MIN_SPEEDUP = MIN_GAIN


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


def clearly_faster(candidate_s: float, baseline_s: float) -> bool:
    """Whether `candidate_s` seconds beat `baseline_s` by at least MIN_SPEEDUP."""
    return is_faster(candidate_s, baseline_s, MIN_SPEEDUP)
