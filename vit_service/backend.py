"""The inference backend, VIT_BACKEND=auto|torch|onnxruntime: a torch `Predictor` or an
onnxruntime `OnnxPredictor`, both `ImagePredictor`s (vit_service/predictor.py).

"auto" serves with torch on GPUs. On a CPU-only host whose model holds `model.onnx` (vit-export
--onnx) and where onnxruntime is installed, it times both at warm-up, as VIT_PRECISION=auto does
for bf16, and keeps onnxruntime only if it is at least 10% faster there; otherwise torch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vit_service.formats.onnx_export import ONNX_FILE
from vit_service.inference import Predictor
from vit_service.predictor import ImagePredictor, clearly_faster

BACKENDS = ("auto", "torch", "onnxruntime")


def onnxruntime_usable(directory: str | os.PathLike[str]) -> bool:
    if not (Path(directory) / ONNX_FILE).is_file():
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_backend(directory: str | os.PathLike[str], backend: str = "auto", device: str = "auto",
                 precision: str = "auto", compile_mode: str | None = None, threads: int | None = None) -> ImagePredictor:
    """A predictor for the exported model in `directory` on the backend VIT_BACKEND names."""
    if backend not in BACKENDS:
        raise ValueError(f"VIT_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":
        if not (Path(directory) / ONNX_FILE).is_file():
            raise ValueError(f"VIT_BACKEND=onnxruntime but the model has no {ONNX_FILE}: export it with vit-export --onnx")
        from vit_service.onnx_backend import OnnxPredictor

        return OnnxPredictor(directory, threads=threads)
    torch_predictor = Predictor.from_directory(directory, device=device, precision=precision, compile_mode=compile_mode)
    if backend == "torch" or torch_predictor.device.type != "cpu" or compile_mode or not onnxruntime_usable(directory):
        return torch_predictor
    from vit_service.onnx_backend import OnnxPredictor

    return FasterOfTwo(torch_predictor, OnnxPredictor(directory, threads=threads))


class FasterOfTwo:
    """Torch and onnxruntime for one model; after `warmup`, serves with the one measured faster."""

    def __init__(self, torch_predictor: Predictor, onnx_predictor: ImagePredictor) -> None:
        self.candidates: dict[str, ImagePredictor] = {"torch": torch_predictor, "onnxruntime": onnx_predictor}
        self.backend = "torch"
        self.backend_timings: dict[str, float] = {}
        self.artifact = torch_predictor.artifact
        self.preprocessing = torch_predictor.preprocessing
        self.input_shape = torch_predictor.input_shape

    @property
    def chosen(self) -> ImagePredictor:
        return self.candidates[self.backend]

    @property
    def num_classes(self) -> int:
        return len(self.artifact.class_names)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.chosen.predict_proba(images)

    def warmup(self, max_batch_size: int) -> float:
        start = time.perf_counter()
        for predictor in self.candidates.values():
            predictor.warmup(max_batch_size)  # torch picks its precision here
        x = np.zeros((max_batch_size, *self.input_shape), dtype=np.uint8)
        samples: dict[str, list[float]] = {name: [] for name in self.candidates}
        for round_ in range(3):
            names = list(self.candidates)
            for name in names if round_ % 2 == 0 else names[::-1]:  # alternate: load hits both alike
                t0 = time.perf_counter()
                self.candidates[name].predict_proba(x)
                samples[name].append(time.perf_counter() - t0)
        self.backend_timings = {name: round(float(np.median(s)), 4) for name, s in samples.items()}
        t = self.backend_timings
        self.backend = "onnxruntime" if clearly_faster(t["onnxruntime"], t["torch"]) else "torch"
        self.candidates = {self.backend: self.chosen}  # free the other one
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        return {**self.chosen.describe(), "backend": self.backend, "backend_timings_s": self.backend_timings}


__all__ = ["BACKENDS", "load_backend", "onnxruntime_usable", "FasterOfTwo"]
