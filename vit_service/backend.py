"""The inference backend, VIT_BACKEND=auto|torch|onnxruntime with VIT_PRECISION: a torch `Predictor`,
an onnxruntime `OnnxPredictor` (fp32 or int8), or the `Fastest` of several, all `ImagePredictor`s
(vit_service/predictor.py).

    VIT_PRECISION=int8        model.int8.onnx (vit-export --int8) on onnxruntime; a start-up error
                              if the model has none, or if its recorded top-1 agreement with fp32
                              is below 99% (vit_service/quantize.py)
    VIT_BACKEND=auto on GPUs  torch
    VIT_BACKEND=auto on CPUs  torch (fp32, or bf16 where measured faster), onnxruntime fp32 and,
                              with VIT_PRECISION=auto, onnxruntime int8 where the artifact's
                              agreement passes the guard: timed at warm-up, each kept only if at
                              least 10% faster than the best before it (vit_service.host.faster).
                              A model exported without --onnx gets its ONNX graph exported at first
                              load into `.onnx-cache/` inside the model folder (needs the onnx
                              extra), reused by every later start.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vit_service.formats.onnx_export import ONNX_FILE
from vit_service.host import faster, importable
from vit_service.inference import RACE_BATCH, RACE_BUDGET_S, Predictor
from vit_service.predictor import ImagePredictor
from vit_service.quantize import int8_guard

BACKENDS = ("auto", "torch", "onnxruntime")
ONNX_CACHE = ".onnx-cache"
logger = logging.getLogger("bentoml.vit_service")


def onnx_graph(directory: str | os.PathLike[str], predictor: Predictor | None = None) -> Path | None:
    """model.onnx for the model in `directory`: the exported one, else the cached export, else one
    exported now into the cache (None where onnxruntime or the exporter is not installed). A
    read-only model folder gets a temporary cache for this process."""
    directory = Path(directory)
    if not importable("onnxruntime"):
        return None
    for path in (directory / ONNX_FILE, directory / ONNX_CACHE / ONNX_FILE):
        if path.is_file():
            return path
    if predictor is None or not importable("onnx", "onnxscript"):
        return None
    from vit_service.formats.onnx_export import export_onnx

    cache = directory / ONNX_CACHE
    try:
        cache.mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="export-", dir=cache))
    except OSError:
        cache = work = Path(tempfile.mkdtemp(prefix="vit-onnx-cache-"))
    start = time.perf_counter()
    exported = export_onnx(predictor.model, work)
    target = cache / ONNX_FILE
    os.replace(exported, target)  # atomic: a second worker exporting at the same time is harmless
    if work != cache:
        work.rmdir()
    logger.info("exported %s for onnxruntime in %.1f s (cached)", target, time.perf_counter() - start)
    return target


def check_servable(directory: str | os.PathLike[str], backend: str = "auto", precision: str = "auto") -> None:
    """Raises ValueError, naming the problem and the fix, where the model in `directory` cannot be
    served with this backend and precision. Cheap (no weights loaded): `bentoml serve` runs it
    before any worker starts, and `load_backend` before it loads anything."""
    from vit_service.artifact import ModelArtifact, check_weights

    if backend not in BACKENDS:
        raise ValueError(f"VIT_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_weights(directory)  # the manifest too
    if precision == "int8":
        if backend == "torch":
            raise ValueError("VIT_PRECISION=int8 runs on onnxruntime: set VIT_BACKEND=auto or onnxruntime, not torch")
        refused = int8_guard(ModelArtifact.read(directory).int8)
        if refused:
            raise ValueError(f"VIT_PRECISION=int8 but {refused}; serve it with VIT_PRECISION=auto or fp32")
    if (precision == "int8" or backend == "onnxruntime") and not importable("onnxruntime"):
        raise ValueError("onnxruntime is not installed (VIT_PRECISION=int8 and VIT_BACKEND=onnxruntime run on it): "
                         "pip install -e '.[onnx]'")
    if backend == "onnxruntime" and not (Path(directory) / ONNX_FILE).is_file():
        raise ValueError(f"VIT_BACKEND=onnxruntime but the model has no {ONNX_FILE}: export it with vit-export --onnx")


def int8_predictor(directory: str | os.PathLike[str], threads: int | None = None,
                   calibrated: bool = True) -> ImagePredictor:
    """The model's int8 graph (model.int8.onnx), on onnxruntime; `check_servable` says whether it may serve."""
    from vit_service.artifact import ModelArtifact
    from vit_service.onnx_backend import OnnxPredictor

    record = ModelArtifact.read(directory).int8
    return OnnxPredictor(directory, threads=threads, path=Path(directory) / record["file"], precision="int8",
                         calibrated=calibrated)


def load_backend(directory: str | os.PathLike[str], backend: str = "auto", device: str = "auto",
                 precision: str = "auto", compile_mode: str | None = None, threads: int | None = None,
                 calibrated: bool = True) -> ImagePredictor:
    """A predictor for the exported model in `directory` on the backend VIT_BACKEND names. Every one
    it builds divides the logits by the artifact's temperature, or none with calibrated=False
    (VIT_SCORES=raw), so whichever backend wins the race serves the same scores."""
    check_servable(directory, backend, precision)
    if precision == "int8":
        return int8_predictor(directory, threads, calibrated)
    from vit_service.onnx_backend import OnnxPredictor

    int8_ok = precision == "auto" and importable("onnxruntime") and _int8_passes(directory)
    if backend == "onnxruntime":
        fp32 = OnnxPredictor(directory, threads=threads, calibrated=calibrated)
        return (Fastest({"onnxruntime": fp32, "onnxruntime int8": int8_predictor(directory, threads, calibrated)})
                if int8_ok else fp32)
    torch_predictor = Predictor.from_directory(directory, device=device, precision=precision, compile_mode=compile_mode,
                                               calibrated=calibrated)
    if backend == "torch" or torch_predictor.device.type != "cpu" or compile_mode:
        return torch_predictor
    candidates: dict[str, ImagePredictor] = {"torch": torch_predictor}
    graph = onnx_graph(directory, torch_predictor)
    if graph is not None:
        candidates["onnxruntime"] = OnnxPredictor(directory, threads=threads, path=graph, calibrated=calibrated)
    if int8_ok:
        candidates["onnxruntime int8"] = int8_predictor(directory, threads, calibrated)
    return Fastest(candidates) if len(candidates) > 1 else torch_predictor


def _int8_passes(directory: str | os.PathLike[str]) -> bool:
    from vit_service.artifact import ModelArtifact

    reason = int8_guard(ModelArtifact.read(directory).int8)
    if reason and "no int8 version" not in reason:
        logger.warning("%s: int8 not used: %s", directory, reason)
    return reason is None


class Fastest:
    """Several predictors of one model, most trusted first (torch, onnxruntime fp32, int8); after
    `warmup`, serves with the one measured fastest, where each must be >= 10% faster than the
    best before it to take its place."""

    def __init__(self, candidates: dict[str, ImagePredictor]) -> None:
        self.candidates = dict(candidates)
        first = next(iter(self.candidates.values()))
        self.backend = next(iter(self.candidates))
        self.backend_timings: dict[str, float] = {}
        self.artifact = first.artifact
        self.preprocessing = first.preprocessing
        self.input_shape = first.input_shape

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
        x = np.zeros((min(max_batch_size, RACE_BATCH), *self.input_shape), dtype=np.uint8)
        names = list(self.candidates)
        best = names[0]
        for name in names[1:]:
            race = faster(lambda n=name: self.candidates[n].predict_proba(x),
                          lambda b=best: self.candidates[b].predict_proba(x), budget_s=RACE_BUDGET_S)
            self.backend_timings.update(race.timings(name, best))
            if race:
                best = name
        self.backend = best
        self.candidates = {best: self.candidates[best]}  # free the others
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        return {**self.chosen.describe(), "backend_choice": self.backend, "backend_timings_s": self.backend_timings}


__all__ = ["BACKENDS", "Fastest", "check_servable", "int8_predictor", "load_backend", "onnx_graph"]
