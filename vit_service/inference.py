"""Batched inference on the model's device: uint8 images in, class probabilities out.

The model service calls `Predictor.predict_proba` once per adaptive batch. Images cross to the
device as uint8 (a quarter of the bytes of float32), from pinned host memory with a non-blocking
copy on CUDA; `Preprocessing.normalize` then runs on the device, the forward pass under bf16 (or
fp16) autocast, and the softmax of logits / T in float32, T the temperature fitted at export
(vit_service/calibration.py; 1.0 for a model without one, or with calibrated=False: VIT_SCORES=raw).
On the CPU everything stays float32.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import numpy as np
import torch

from vit_service.artifact import ModelArtifact, load_model
from vit_service.calibration import served_calibration
from vit_service.host import cpu_can_accelerate_bf16, faster, read_cpu
from vit_service.model import VisionTransformer
from vit_service.predictor import check_batch, warm_up

Precision = Literal["fp32", "bf16", "fp16"]
# Warm-up races (precision here, backends in backend.py) time batches of at most RACE_BATCH images
# within RACE_BUDGET_S seconds each: /readyz should answer 200 within ~10 s of the model loading.
RACE_BATCH = 8
RACE_BUDGET_S = 2.0
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """The device for `name`: CUDA when available for "auto", else the CPU; "cuda:1" etc. as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The autocast precision for `name`: for "auto", bf16 where the GPU has it, else fp16; fp32 on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return name  # type: ignore[return-value]


class Predictor:
    """A VisionTransformer ready to serve: eval mode, on its device, with its artifact
    (an `ImagePredictor`, vit_service/predictor.py)."""

    def __init__(self, model: VisionTransformer, artifact: ModelArtifact, device: torch.device,
                 precision: str = "auto", compile_mode: str | None = None, calibrated: bool = True) -> None:
        self.device = device
        self.calibrated = calibrated
        self.temperature = artifact.temperature if calibrated else 1.0
        self.precision = resolve_precision(precision, device)
        # "auto" on a CPU: fp32 unless bf16 autocast is measured faster at warm-up, and timed only
        # where the CPU has bf16 instructions (AVX512-BF16 or AMX: ~1.4x faster); without them
        # oneDNN emulates bf16, 2-5x slower, and timing it cost 28 s of warm-up on an AVX2 EPYC.
        cpu_auto = precision == "auto" and device.type == "cpu" and not compile_mode
        self.measure_cpu_bf16 = cpu_auto and cpu_can_accelerate_bf16(read_cpu())
        self.precision_reason = ("CPU without avx512_bf16/amx: fp32, bf16 not timed"
                                 if cpu_auto and not self.measure_cpu_bf16 else None)
        self.precision_timings: dict[str, float] = {}
        self.artifact = artifact
        self.preprocessing = artifact.preprocessing
        S = self.preprocessing.image_size
        self.input_shape = (3, S, S)
        # Only the patch-embedding convolution sees the NCHW layout; channels-last lets cuDNN pick
        # its NHWC kernels for it on GPUs. On the CPU it buys nothing, so it stays off there.
        self.channels_last = device.type == "cuda"
        self.model = model.to(device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size: tune the conv once
            torch.backends.cuda.matmul.allow_tf32 = True
        self.compile_mode = compile_mode
        # dynamic=True: one graph for every batch size the batcher forms, not one per size.
        self.forward = (torch.compile(self.model, mode=compile_mode, dynamic=True)
                        if compile_mode else self.model)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str], device: str = "auto",
                       precision: str = "auto", compile_mode: str | None = None, calibrated: bool = True) -> Predictor:
        dev = resolve_device(device)
        model, artifact = load_model(directory, dev)
        return cls(model, artifact, dev, precision=precision, compile_mode=compile_mode, calibrated=calibrated)

    @property
    def num_classes(self) -> int:
        return len(self.artifact.class_names)

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) uint8 images -> (B, num_classes) float32 probabilities, softmax(logits / T)."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(_writable(images))
        check_batch(str(x.dtype).removeprefix("torch."), tuple(x.shape), self.input_shape)
        if x.shape[0] == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = self.preprocessing.normalize(x)  # (B, 3, S, S) float32 on the device
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"):
            logits = self.forward(x)  # (B, K)
        return (logits.float() / self.temperature).softmax(dim=-1).cpu().numpy()

    def warmup(self, max_batch_size: int) -> float:
        """Runs the batch sizes the server will see first, so no request pays for cuDNN tuning,
        CUDA context set-up, allocator growth or compilation. Returns the seconds it took."""
        start = time.perf_counter()
        if self.measure_cpu_bf16:
            self.precision = self._faster_cpu_precision(max_batch_size)
        warm_up(self.predict_proba, self.input_shape, max_batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _faster_cpu_precision(self, batch_size: int) -> Precision:
        """Times bf16 autocast against fp32 (vit_service.host.faster: alternating rounds within
        RACE_BUDGET_S, at a batch of at most RACE_BATCH); bf16 only if at least 10% faster."""
        x = np.zeros((min(batch_size, RACE_BATCH), *self.input_shape), dtype=np.uint8)

        def run(precision: Precision):
            def call() -> None:
                self.precision = precision
                self.predict_proba(x)
            return call

        race = faster(run("bf16"), run("fp32"), budget_s=RACE_BUDGET_S)
        self.precision_timings = race.timings("bf16", "fp32")
        self.precision_reason = "bf16 measured >= 10% faster" if race else "bf16 not measured >= 10% faster"
        return "bf16" if race else "fp32"  # the race's verdict, never re-decided from rounded timings

    def describe(self) -> dict[str, Any]:
        return {"backend": "torch", "device": str(self.device), "precision": self.precision,
                "precision_timings_s": self.precision_timings,
                **({"precision_reason": self.precision_reason} if self.precision_reason else {}),
                "compile": self.compile_mode or False, "channels_last": self.channels_last,
                **served_calibration(self.artifact.calibration, self.calibrated)}


def _writable(a: np.ndarray) -> np.ndarray:
    # Arrays unpickled from another process's buffer are read-only; torch wants writable memory.
    return a if a.flags.writeable else np.array(a)


def top_k_predictions(probs: np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    """(K,) probabilities -> the k most likely classes, highest first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": class_names[i], "index": int(i), "score": float(probs[i])} for i in order]


def classes_preview(class_names: list[str], shown: int = 20) -> str:
    """The first `shown` class names, for an error about an unknown class."""
    return ", ".join(class_names[:shown]) + (" ..." if len(class_names) > shown else "")


__all__ = ["Predictor", "classes_preview", "resolve_device", "resolve_precision", "top_k_predictions"]
