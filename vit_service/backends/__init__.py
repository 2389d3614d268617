"""Inference backends: VIT_BACKEND names one of REGISTRY's runtimes, or `auto`.

    torch      the reference, and the runtime for GPUs (bf16/fp16 autocast, torch.compile)
    openvino   CPUs: fp32, bf16 where the CPU has avx512_bf16 or AMX, int8 (model.int8.xml from
               `vit-export --int8`: NNCF static quantization behind the 99% agreement guard)

`auto` on a GPU is torch. On a CPU the candidates (`candidates`) are measured once per host and
model and the verdict kept (decision.py); with VIT_PRECISION set, only candidates of that precision.
`load_backend` returns a `Predictor` (base.py), the one object serving calls, whatever runs inside.
A new backend is one file with a `Runtime` class (base.py), one line in REGISTRY and its test.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np

from vit_service.artifact import ModelArtifact, check_weights
from vit_service.backends.base import ModelSource, Predictor, Runtime
from vit_service.backends.decision import RACE_BATCH, Candidate, decision_key, kept_or_measured, race
from vit_service.host import CpuInfo, cpu_can_accelerate_bf16, importable, read_cpu
from vit_service.quantize import int8_guard

# name -> (its Runtime class, the package it needs)
REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("vit_service.backends.torch_runtime:TorchRuntime", "torch"),
    "openvino": ("vit_service.backends.openvino_runtime:OpenVINORuntime", "openvino"),
}
BACKENDS = ("auto", *REGISTRY)


def runtime_class(name: str) -> type[Runtime]:
    module, _, cls = REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def installed(name: str) -> bool:
    return importable(REGISTRY[name][1])


def check_servable(directory: str | os.PathLike[str], backend: str = "auto", precision: str = "auto") -> None:
    """Raises ValueError, naming the problem and the fix, where the model in `directory` cannot be
    served with this backend and precision. Cheap (no weights loaded): `bentoml serve` runs it
    before any worker starts, and `load_backend` before it loads anything."""
    if backend not in BACKENDS:
        retired = (" (onnxruntime serving was retired: openvino serves the same model.onnx, faster)"
                   if backend == "onnxruntime" else "")
        raise ValueError(f"VIT_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}{retired}")
    check_weights(directory)  # the manifest too
    if backend != "auto" and not installed(backend):
        raise ValueError(f"VIT_BACKEND={backend} but {REGISTRY[backend][1]} is not installed: pip install {REGISTRY[backend][1]}")
    if precision == "int8":
        if backend == "torch":
            raise ValueError("VIT_PRECISION=int8 runs on openvino: set VIT_BACKEND=auto or openvino, not torch")
        refused = int8_guard(ModelArtifact.read(directory).int8)
        if refused:
            raise ValueError(f"VIT_PRECISION=int8 but {refused}; serve it with VIT_PRECISION=auto or fp32")
        if not installed("openvino"):
            raise ValueError("VIT_PRECISION=int8 runs on openvino, which is not installed: pip install openvino")


def candidates(backend: str, precision: str, device_type: str, cpu: CpuInfo, artifact: ModelArtifact,
               compile_mode: str | None = None) -> list[Candidate]:
    """What may serve, most trusted first. GPUs, torch.compile and explicit fp16 are torch's alone."""
    if device_type != "cpu" or compile_mode:
        return [Candidate("torch", precision)]
    bf16 = cpu_can_accelerate_bf16(cpu)  # without the instructions bf16 is emulated: never a candidate
    offered = {"torch": ["fp32"] + ["bf16"] * bf16,
               "openvino": ["fp32"] + ["bf16"] * bf16 + ["int8"] * (int8_guard(artifact.int8) is None)}
    names = [backend] if backend != "auto" else [n for n in REGISTRY if installed(n)]
    if precision != "auto":  # asked for: a candidate even where it is emulated
        return [Candidate(n, precision) for n in names if precision in runtime_class(n).precisions]
    return [Candidate(n, p) for n in names for p in offered[n]]


def load_backend(directory: str | os.PathLike[str], backend: str = "auto", device: str = "auto",
                 precision: str = "auto", compile_mode: str | None = None, threads: int | None = None,
                 calibrated: bool = True, cpu: CpuInfo | None = None, cache: Path | None = None) -> Predictor:
    """A `Predictor` for the exported model in `directory`. With one candidate its runtime is built
    now; with several, at `warmup`, from the decision kept for this host or one measured then.
    `cpu` stands in for this host's CPU (tests); `cache` for decision.cache_dir()."""
    from vit_service.backends.torch_runtime import resolve_device

    check_servable(directory, backend, precision)
    source = ModelSource(directory, resolve_device(device))
    cpu = cpu or read_cpu()
    options = candidates(backend, precision, source.device.type, cpu, source.artifact, compile_mode)
    if not options:
        raise ValueError(f"no backend runs precision {precision!r} (VIT_BACKEND={backend})")

    def build(c: Candidate) -> Runtime:
        kwargs: dict[str, Any] = {"compile_mode": compile_mode} if c.backend == "torch" else {"cache": cache}
        return runtime_class(c.backend)(source, precision=c.precision, threads=threads, **kwargs)

    if len(options) == 1:
        return Predictor(source, build(options[0]), calibrated)

    def choose(max_batch_size: int) -> tuple[Runtime, dict[str, Any]]:
        built: dict[Candidate, Runtime] = {}

        def measure(listed: list[Candidate], batch: int):
            for c in listed:
                built[c] = build(c)
            x = np.zeros((batch, 3, source.artifact.preprocessing.image_size,
                          source.artifact.preprocessing.image_size), np.uint8)
            return race({c: Predictor(source, r, calibrated).predict_proba for c, r in built.items()}, x)

        versions = {n: _version(REGISTRY[n][1]) for n in REGISTRY}
        key = decision_key(cpu, source.fingerprint, threads, max_batch_size, backend, precision, versions)
        decision = kept_or_measured(key, options, measure, min(max_batch_size, RACE_BATCH), cache)
        chosen = Candidate(decision.backend, decision.precision)
        return built.get(chosen) or build(chosen), decision.to_dict()

    return Predictor(source, None, calibrated, choose=choose)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


__all__ = ["BACKENDS", "REGISTRY", "Predictor", "candidates", "check_servable", "load_backend", "runtime_class"]
