"""Service settings: environment variables read once at start-up, each declared once below with its
default and one line of documentation (`python -m vit_service.serving.settings` prints the table
the README shows; a test keeps the two equal).

Defaults marked "host" follow the host's CPU cores and device (see bench/README.md, "GPU on paper"):
    CPU only  VIT_MODE=inprocess: the model runs in the front process behind an in-process
              batcher. 1 worker (a second would hold a second model and fight for the same
              cores), max batch 16 (the CPU's best raw batch). Threads never oversubscribe the
              cores: decode threads = max(1, cores // 4), model threads (torch and onnxruntime
              intra-op) = cores - decode threads; 2 cores: 1 + 1 (was 2 decode + torch's 2).
              Why: decoding is ~2 ms of CPU a photo against ~16 ms for a vit_tiny forward at one
              thread (Server-Timing stages, bench/README.md), so one decode thread per four cores
              keeps up; and OpenMP threads spin-wait, so a forward pass whose thread loses its core
              to a decode thread stalls as a whole (measured on the 2-core EPYC: 1 torch thread
              p50 23.0 ms against 29.0 ms with 2 at one client, quiet; under load 2 threads fell to
              1.1 img/s at batch 1). The price measured there: 58-61 against 74-79 img/s at 16-32
              clients with the load client on the same 2 cores; set VIT_TORCH_THREADS=2 where
              throughput matters more than latency on such a small host.
    CUDA      VIT_MODE=split: a model service owns the GPU, front workers decode. The GPU does
              thousands of images/s and one core decodes ~100-200 photos/s, so every core but one
              (left to the model process) runs a front worker with 2 decode threads; max batch 64.
Any variable set overrides its derived default; a bad value is a start-up error naming it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from vit_service.preprocessing import DEFAULT_MAX_PIXELS
from vit_service.serving.store import DEFAULT_MODEL_TAG

Mode = Literal["inprocess", "split"]
MODES = ("auto", "inprocess", "split")


@dataclass(frozen=True)
class Host:
    gpu: bool  # VIT_DEVICE resolves to CUDA here
    cores: int


@dataclass(frozen=True)
class Variable:
    env: str
    default: str  # as documented
    doc: str
    read: Callable[[str, str, Host], Any]  # (name, value or "" when unset, host) -> setting


def setting(env: str, default: str, doc: str, read: Callable[[str, str, Host], Any]) -> Any:
    """A Settings field read from the environment variable `env`."""
    return field(metadata={"variable": Variable(env, default, doc, read)})


def text(default: str) -> Callable[[str, str, Host], str]:
    return lambda name, raw, host: raw or default


def integer(default: int | Callable[[Host], int], minimum: int = 1) -> Callable[[str, str, Host], int]:
    def read(name: str, raw: str, host: Host) -> int:
        if not raw:
            return default(host) if callable(default) else default
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
        return value

    return read


def flag(default: bool) -> Callable[[str, str, Host], bool]:
    def read(name: str, raw: str, host: Host) -> bool:
        if not raw:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be 1 or 0, got {raw!r}")

    return read


def read_mode(name: str, raw: str, host: Host) -> Mode:
    mode = raw or "auto"
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {', '.join(MODES)}, got {mode!r}")
    return ("split" if host.gpu else "inprocess") if mode == "auto" else mode  # type: ignore[return-value]


def read_compile(name: str, raw: str, host: Host) -> str | None:
    return None if raw in ("", "0") else ("default" if raw == "1" else raw)


def read_optional_int(name: str, raw: str, host: Host) -> int | None:
    return integer(1)(name, raw, host) if raw else None


def host_cores() -> int:
    """CPU cores this process may run on (a container's CPU set, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cuda_wanted(device: str) -> bool:
    """Whether `device` (VIT_DEVICE) resolves to a GPU on this host."""
    if device == "cpu":
        return False
    import torch

    if device.startswith("cuda"):
        return True  # and if CUDA is missing, the predictor says so clearly at start-up
    if device != "auto":
        raise ValueError(f"VIT_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Settings:
    model_tag: str = setting("VIT_MODEL_TAG", f"`{DEFAULT_MODEL_TAG}`", "model in the BentoML model store",
                             text(DEFAULT_MODEL_TAG))
    mode: Mode = setting("VIT_MODE", "`auto`", "`inprocess` (auto on CPU-only hosts): the model in the front process "
                         "behind an in-process batcher; `split` (auto with CUDA): a model service (`bentoml.depends`) "
                         "owns the GPU while front workers decode", read_mode)
    device: str = setting("VIT_DEVICE", "`auto`", "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`", text("auto"))
    precision: str = setting("VIT_PRECISION", "`auto`", "`fp32`, `bf16`, `fp16`, `int8` (`model.int8.onnx` from "
                             "`vit-export --int8`, on onnxruntime; refused if its recorded top-1 agreement with fp32 "
                             "is < 99%); `auto`: bf16 (fp16 on older GPUs) on CUDA; on a CPU bf16 autocast only where "
                             "the CPU has avx512_bf16/amx and it is measured >= 10% faster at warm-up, and int8 where "
                             "the guard passes and it is measured >= 10% faster", text("auto"))
    compile_mode: str | None = setting("VIT_COMPILE", "`0`", "`1` (torch.compile's default mode) or a mode, e.g. "
                                       "`max-autotune`", read_compile)
    backend: str = setting("VIT_BACKEND", "`auto`", "`torch`, `onnxruntime` (needs `model.onnx`: `vit-export --onnx`); "
                           "`auto` uses torch on GPUs and, on a CPU-only host with onnxruntime, times both at warm-up and "
                           "keeps onnxruntime if >= 10% faster (`/model_info` shows the choice and timings); a model "
                           "without `model.onnx` gets it exported at first load into `.onnx-cache/` in its folder "
                           "(needs the onnx extra)", text("auto"))
    batching: bool = setting("VIT_BATCHING", "`1`", "`0`: no batching, one forward pass per request", flag(True))
    # BentoML's batcher requires max_batch_size > 1.
    max_batch_size: int = setting("VIT_MAX_BATCH_SIZE", "host: 16 on CPU, 64 on GPU", "most images in one forward pass",
                                  integer(lambda host: 64 if host.gpu else 16, minimum=2))
    max_latency_ms: int = setting("VIT_MAX_LATENCY_MS", "2000", "longest wait in the batch queue, else 503",
                                  integer(2000))
    max_images: int = setting("VIT_MAX_IMAGES_PER_REQUEST", "32", "`/classify_batch` limit, else 413", integer(32))
    max_body_bytes: int = setting("VIT_MAX_BODY_BYTES", "33554432", "request body limit (32 MiB), else 413",
                                  integer(32 * 2**20))
    max_image_pixels: int = setting("VIT_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS), "larger images are refused "
                                    "(decompression bombs), 400", integer(DEFAULT_MAX_PIXELS))
    jpeg_draft: bool = setting("VIT_JPEG_DRAFT", "`1`", "decode large JPEGs at reduced scale (DCT scaling)", flag(True))
    timeout: int = setting("VIT_TIMEOUT", "30", "seconds per request, else 504", integer(30))
    max_concurrency: int = setting("VIT_MAX_CONCURRENCY", "64", "requests in flight on the front, beyond that 429",
                                   integer(64))
    workers: int = setting("VIT_WORKERS", "host: 1 on CPU, cores-1 on GPU", "front worker processes",
                           integer(lambda host: max(1, host.cores - 1) if host.gpu else 1))
    decode_threads: int = setting("VIT_DECODE_THREADS", "host: max(1, cores // 4) on CPU, 2 on GPU",
                                  "decoding threads per front worker",
                                  integer(lambda host: 2 if host.gpu else max(1, host.cores // 4)))
    torch_threads: int | None = setting("VIT_TORCH_THREADS", "in-process: cores - decode threads; else torch's",
                                        "intra-op threads of the model (torch and onnxruntime)", read_optional_int)
    cores: int = field(default=1)  # the host's, not a setting

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        def raw(var: Variable) -> str:
            return environ.get(var.env, "").strip()

        device_var = _variables()["device"]
        device = device_var.read(device_var.env, raw(device_var), Host(False, 0))
        host = Host(gpu=cuda_wanted(device), cores=host_cores())
        return cls(**{name: var.read(var.env, raw(var), host) for name, var in _variables().items()}, cores=host.cores)

    @property
    def model_threads(self) -> int | None:
        """Intra-op threads of the model: VIT_TORCH_THREADS, else in-process the cores the decode
        threads leave (never oversubscribed), else None (torch's default: one per core)."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, self.cores - self.decode_threads) if self.mode == "inprocess" else None

    def describe(self) -> dict[str, object]:
        """What /model_info shows under "serving" about the process layout."""
        return {"mode": self.mode, "workers": self.workers, "decode_threads": self.decode_threads,
                "torch_threads": self.model_threads, "host_cores": self.cores}


def _variables() -> dict[str, Variable]:
    return {f.name: f.metadata["variable"] for f in fields(Settings) if "variable" in f.metadata}


def markdown_table() -> str:
    """The settings as the README's table: variable, default, meaning."""
    rows = [f"| `{v.env}` | {v.default} | {v.doc} |" for v in _variables().values()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


@functools.cache
def current_settings() -> Settings:
    """This process's settings, read from the environment once."""
    return Settings.from_env()


if __name__ == "__main__":
    print(markdown_table())
