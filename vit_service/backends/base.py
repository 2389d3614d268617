"""What every backend shares: the `Runtime` contract, the model it is built from, and `Predictor`,
the one object serving calls.

A runtime runs the network only: normalised (B, 3, S, S) float32 pixels in, (B, K) logits out.
`Predictor` wraps the chosen runtime and owns every step around the forward, written once for all
of them: the batch check, the device copy, `Preprocessing.normalize` and softmax(logits / T), T the
artifact's temperature (1.0 without one, or with calibrated=False: VIT_SCORES=raw). So whichever
runtime serves, the same upload gets the same preprocessing and the same score arithmetic.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from vit_service.artifact import MANIFEST_FILE, WEIGHTS_FILE, ModelArtifact, load_model
from vit_service.calibration import served_calibration
from vit_service.model import VisionTransformer


class ModelSource:
    """An exported model folder, its artifact, and its torch model loaded at most once per process:
    the runtimes built from it (and /explain, which needs attention weights and gradients) share
    that one copy instead of loading their own."""

    def __init__(self, directory: str | os.PathLike[str], device: torch.device | str = "cpu") -> None:
        self.directory = Path(directory)
        self.artifact = ModelArtifact.read(directory)
        self.device = torch.device(device)

    @cached_property
    def torch_model(self) -> VisionTransformer:
        return load_model(self.directory, self.device)[0]

    @property
    def loaded(self) -> bool:
        """Whether the torch model is in memory (tests: a backend that never needed it never loads it)."""
        return "torch_model" in self.__dict__

    @cached_property
    def fingerprint(self) -> str:
        """Identifies these weights and this manifest (the model version a kept decision belongs to):
        the manifest's bytes and the weights file's size and first and last MiB, read in a few ms."""
        digest = hashlib.sha256((self.directory / MANIFEST_FILE).read_bytes())
        weights = self.directory / WEIGHTS_FILE
        size = weights.stat().st_size
        with open(weights, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
        digest.update(str(size).encode())
        return digest.hexdigest()[:16]


class Runtime(Protocol):
    """One way to run the network (torch, OpenVINO, ...): built for one precision, on one device."""

    name: ClassVar[str]
    precision: str
    device: torch.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 normalised pixels on `device` -> (B, K) logits (any float dtype)."""

    def describe(self) -> dict[str, Any]:
        """What /model_info shows of this runtime beyond its name and precision."""


def check_batch(dtype: str, shape: tuple[int, ...], input_shape: tuple[int, int, int]) -> None:
    """Raises ValueError unless (dtype, shape) is a uint8 batch of `input_shape` images."""
    if dtype != "uint8" or len(shape) != 4 or tuple(shape[1:]) != input_shape:
        raise ValueError(f"expected a uint8 batch of shape (B, {', '.join(map(str, input_shape))}), "
                         f"got {dtype} {tuple(shape)}")


def warm_up(predict_proba: Callable[[np.ndarray], Any], input_shape: tuple[int, int, int], max_batch_size: int) -> None:
    """One call at each batch size the server sees first: 1, 2 and the largest."""
    for n in sorted({1, 2, max_batch_size}):
        predict_proba(np.zeros((n, *input_shape), dtype=np.uint8))


class Predictor:
    """A model ready to serve on one runtime: (B, 3, S, S) uint8 -> (B, K) float32 probabilities."""

    def __init__(self, source: ModelSource, runtime: Runtime | None, calibrated: bool = True,
                 choose: Callable[[int], tuple[Runtime, dict[str, Any]]] | None = None) -> None:
        """`runtime` None: `choose(max_batch_size)` picks it at `warmup` (backends.load_backend)."""
        if runtime is None and choose is None:
            raise ValueError("a Predictor needs a runtime or a way to choose one")
        self.source = source
        self._runtime, self._choose = runtime, choose
        self.artifact = source.artifact
        self.preprocessing = self.artifact.preprocessing
        S = self.preprocessing.image_size
        self.input_shape = (3, S, S)
        self.calibrated = calibrated
        self.temperature = self.artifact.temperature if calibrated else 1.0
        self.decision: dict[str, Any] | None = None  # how the runtime was chosen (decision.py), for /model_info

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the backend is chosen at warm-up: call warmup() first")
        return self._runtime

    @property
    def num_classes(self) -> int:
        return len(self.artifact.class_names)

    @property
    def device(self) -> torch.device:
        return self._runtime.device if self._runtime else self.source.device

    @property
    def backend(self) -> str:
        return self._runtime.name if self._runtime else "not chosen yet"

    @property
    def precision(self) -> str:
        return self._runtime.precision if self._runtime else "not chosen yet"

    @property
    def model(self) -> VisionTransformer:
        """The torch model, for /explain: the runtime's own where it runs torch, else loaded once."""
        return self.source.torch_model

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) uint8 images -> (B, num_classes) float32 probabilities, softmax(logits / T)."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(_writable(images))
        check_batch(str(x.dtype).removeprefix("torch."), tuple(x.shape), self.input_shape)
        if x.shape[0] == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        if self.device.type == "cuda":  # uint8 crosses: a quarter of float32's bytes, from pinned memory
            x = x.pin_memory().to(self.device, non_blocking=True)
        logits = self.runtime.forward(self.preprocessing.normalize(x))  # (B, K)
        return (logits.float() / self.temperature).softmax(dim=-1).cpu().numpy()

    def warmup(self, max_batch_size: int) -> float:
        """Runs the batch sizes the server will see first, so no request pays for kernel selection,
        allocator growth or compilation. Returns the seconds it took."""
        start = time.perf_counter()
        if self._runtime is None:
            self._runtime, self.decision = self._choose(max_batch_size)
        warm_up(self.predict_proba, self.input_shape, max_batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.backend, "device": str(self.device), "precision": self.precision,
                                **(self._runtime.describe() if self._runtime else {})}
        if self.decision:
            info["decision"] = self.decision
        if self.precision == "int8":  # how it was measured against fp32 at export (vit_artifact.json)
            info["int8"] = self.artifact.int8
        return {**info, **served_calibration(self.artifact.calibration, self.calibrated, self.precision)}


def _writable(a: np.ndarray) -> np.ndarray:
    # Arrays unpickled from another process's buffer are read-only; torch wants writable memory.
    return a if a.flags.writeable else np.array(a)


__all__ = ["ModelSource", "Predictor", "Runtime", "check_batch", "warm_up"]
