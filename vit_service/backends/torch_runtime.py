"""The torch runtime: the reference every other runtime is measured against, and the one for GPUs.

On CUDA the forward runs under bf16 (or fp16) autocast, channels-last for the patch-embedding
convolution's NHWC kernels, optionally `torch.compile`d; on the CPU fp32, or bf16 autocast where the
kept decision (decision.py) measured it faster.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from vit_service.backends.base import ModelSource

Precision = Literal["fp32", "bf16", "fp16"]
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


class TorchRuntime:
    name: ClassVar[str] = "torch"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")

    def __init__(self, source: ModelSource, precision: str = "auto", threads: int | None = None,
                 compile_mode: str | None = None) -> None:
        self.device = source.device
        self.precision = resolve_precision(precision, self.device)
        # Only the patch-embedding convolution sees the NCHW layout; channels-last lets cuDNN pick
        # its NHWC kernels for it on GPUs. On the CPU it buys nothing, so it stays off there.
        self.channels_last = self.device.type == "cuda"
        self.model = source.torch_model
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size: tune the conv once
            torch.backends.cuda.matmul.allow_tf32 = True
        self.compile_mode = compile_mode
        # dynamic=True: one graph for every batch size the batcher forms, not one per size.
        self.forward_fn = torch.compile(self.model, mode=compile_mode, dynamic=True) if compile_mode else self.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"):
            return self.forward_fn(pixels)  # (B, K)

    def describe(self) -> dict[str, Any]:
        return {"compile": self.compile_mode or False, "channels_last": self.channels_last}


__all__ = ["DTYPES", "TorchRuntime", "resolve_device", "resolve_precision"]
