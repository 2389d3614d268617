"""The OpenVINO runtime: Intel's CPU kernels, fp32, bf16 (where the CPU has avx512_bf16 or AMX) and
static int8 (model.int8.xml, written by `vit-export --int8` with NNCF: vit_service/quantize.py).

The network comes from the model's model.onnx where it was exported with --onnx (read in ~50 ms),
else from the torch model, converted once per model version and kept in the cache folder
(decision.py's `cache_dir`, never the model store's folder) so later starts read it.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vit_service.backends.base import ModelSource
from vit_service.formats.onnx_export import ONNX_FILE
from vit_service.host import cpu_can_accelerate_bf16, read_cpu

logger = logging.getLogger("bentoml.vit_service")
HINTS = {"fp32": "f32", "bf16": "bf16"}


@cache
def core() -> Any:
    import openvino as ov

    return ov.Core()


def network(source: ModelSource, precision: str, cache: Path | None) -> Any:
    """The OpenVINO model for `precision`: int8's own file, else model.onnx, else the cached
    conversion of the torch model (made now and kept in `cache` where there is none)."""
    import openvino as ov

    if precision == "int8":
        return core().read_model(str(source.directory / source.artifact.int8["file"]))
    onnx_file = source.directory / ONNX_FILE
    if onnx_file.is_file():
        return core().read_model(str(onnx_file))
    kept = cache / "openvino" / source.fingerprint / "model.xml" if cache else None
    if kept is not None and kept.is_file():
        return core().read_model(str(kept))
    model = convert(source.torch_model)
    if kept is not None:
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_name(f"model.{os.getpid()}.xml")  # workers converting at once each write their own
            ov.save_model(model, str(tmp), compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(kept.with_suffix(".bin"))  # the .bin first: a reader opens the .xml
            tmp.replace(kept)
        except OSError as e:
            logger.warning("could not keep the OpenVINO conversion in %s (%s): converting again at every start", kept, e)
    return model


def convert(model: torch.nn.Module) -> Any:
    """The torch model as an OpenVINO model with a dynamic batch axis."""
    import openvino as ov

    S = model.config.image_size
    with torch.no_grad():
        return ov.convert_model(model.eval(), example_input=torch.zeros(2, 3, S, S),
                                input=[ov.PartialShape([-1, 3, S, S])])


def compile_for_cpu(model: Any, precision: str, threads: int | None = None) -> Any:
    """`model` (an OpenVINO model or a file) compiled for the CPU at `precision`, as serving runs it."""
    # int8 layers run int8 either way; what NNCF left in float runs in bf16 where the CPU has it.
    hint = HINTS.get(precision) or ("bf16" if cpu_can_accelerate_bf16(read_cpu()) else "f32")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                              # the decode threads of the same process need the cores too: no pinning
                              "ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return core().compile_model(model, "CPU", config)


class OpenVINORuntime:
    name: ClassVar[str] = "openvino"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "int8")

    def __init__(self, source: ModelSource, precision: str = "fp32", threads: int | None = None,
                 cache: Path | None = None) -> None:
        if precision not in self.precisions:
            raise ValueError(f"OpenVINO runs {', '.join(self.precisions)}, not {precision!r}")
        self.device = torch.device("cpu")
        self.precision = precision
        self.threads = threads
        from vit_service.backends.decision import cache_dir

        self.compiled = compile_for_cpu(network(source, precision, cache or cache_dir()), precision, threads)
        self.request = self.compiled.create_infer_request()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: pixels.numpy()}, share_inputs=True)
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data))  # (B, K), a copy

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        return {"openvino": ov.get_version().split("-")[0], "openvino_threads": self.threads,
                "inference_precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}


__all__ = ["OpenVINORuntime", "compile_for_cpu", "convert", "network"]
