"""Service settings: environment variables read once at start-up, each declared once below with its
default and one line of documentation (`python -m vit_service.serving.settings` prints the table
docs/serving.md shows; a test keeps the two equal). Any variable set overrides its derived default;
a bad value is a start-up error naming it.

Defaults marked "host" follow the host's cores, memory and device. The model runs in every front
worker, behind the in-process batcher (model_handle.py):
    CPU   two workers where memory allows (`cpu_workers`), so a worker that dies is no outage, and
          each worker's share of the cores split so threads never oversubscribe it: a quarter
          decodes (at least one thread), the rest runs the model (OpenMP threads spin-wait: a
          forward pass whose thread loses its core to a decode thread stalls as a whole). Max
          batch 16. The measurements behind these choices: bench/README.md, "Workers and faults".
    CUDA  one worker owns the GPU (a second would hold a second copy of the model on it) and
          decodes with every core but one; max batch 64.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vit_service.host import host_cores
from vit_service.preprocessing import DEFAULT_MAX_PIXELS
from vit_service.serving.auth import read_key_file, read_key_list
from vit_service.serving.store import DEFAULT_MODEL_TAG

@dataclass(frozen=True)
class Host:
    gpu: bool  # VIT_DEVICE resolves to CUDA here
    cores: int
    memory: int | None = None  # bytes still available (available_memory); None: unknown
    model_size: int = 0  # bytes of the model's files in the store (model_bytes)


@dataclass(frozen=True)
class Variable:
    env: str
    default: str  # as documented
    doc: str
    read: Callable[[str, str, Host], Any]  # (name, value or "" when unset, host) -> setting


def setting(env: str, default: str, doc: str, read: Callable[[str, str, Host], Any], repr: bool = True) -> Any:
    """A Settings field read from the environment variable `env`."""
    return field(metadata={"variable": Variable(env, default, doc, read)}, repr=repr)


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


def one_of(*choices: str) -> Callable[[str, str, Host], str]:
    """The first choice when unset; a value outside `choices` is an error naming them."""
    def read(name: str, raw: str, host: Host) -> str:
        if raw and raw not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw or choices[0]

    return read


def read_compile(name: str, raw: str, host: Host) -> str | None:
    return None if raw in ("", "0") else ("default" if raw == "1" else raw)


def read_optional_int(name: str, raw: str, host: Host) -> int | None:
    return integer(1)(name, raw, host) if raw else None


# Memory of one worker before its model: torch, BentoML and the service, rounded up from the RSS
# measured serving vit_tiny (bench/README.md, "Workers and faults").
WORKER_BASE_BYTES = 768 * 2**20


def available_memory() -> int | None:
    """Bytes this host can still give: MemAvailable, capped by a container's cgroup limit; None
    if unknown (not Linux)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            available = int(limit) - usage if available is None else min(available, int(limit) - usage)
        break
    return available


def model_bytes(tag: str) -> int:
    """Size of the model's files in the BentoML store; 0 if it is not there (the service then
    stops at start-up with its own clear error)."""
    try:
        import bentoml

        return sum(f.stat().st_size for f in Path(bentoml.models.get(tag).path).rglob("*") if f.is_file())
    except Exception:
        return 0


def cpu_workers(cores: int, available: int | None, model_size: int) -> int:
    """Model-holding workers on a CPU: 2 with 2+ cores and memory for three workers' worth (two,
    and one of headroom for the rest of the host), else 1. A worker is budgeted WORKER_BASE_BYTES
    + 3 x the model's size (weights, a reduced-precision copy, activations)."""
    per_worker = WORKER_BASE_BYTES + 3 * model_size
    return 2 if cores >= 2 and available is not None and available >= 3 * per_worker else 1


def _cpu_workers(host: Host) -> int:
    return cpu_workers(host.cores, host.memory, host.model_size)


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
    device: str = setting("VIT_DEVICE", "`auto`", "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`", text("auto"))
    precision: str = setting("VIT_PRECISION", "`auto`", "`fp32`, `bf16`, `fp16` (torch only), `int8` (`model.int8.xml` "
                             "from `vit-export --int8`, on openvino; refused if its recorded top-1 agreement with fp32 "
                             "is < 99%); `auto`: bf16 (fp16 on older GPUs) on CUDA; on a CPU what the kept decision "
                             "chose (see `VIT_BACKEND`)", text("auto"))
    compile_mode: str | None = setting("VIT_COMPILE", "`0`", "`1` (torch.compile's default mode) or a mode, e.g. "
                                       "`max-autotune`", read_compile)
    backend: str = setting("VIT_BACKEND", "`auto`", "`torch` or `openvino` (CPU); `auto` is torch on GPUs, and on a "
                           "CPU the fastest of torch fp32 and bf16, openvino fp32, bf16 and int8 (bf16 only where the "
                           "CPU has avx512_bf16/amx, int8 only where its guard passes), each kept only if >= 10% "
                           "faster than the best before it: measured at the first start on a host and kept in "
                           "`VIT_CACHE_DIR` for every later start and worker (`/model_info` shows the choice, why, "
                           "and the rates)", text("auto"))
    cache_dir: str = setting("VIT_CACHE_DIR", "`~/.cache/vit-service`", "where the backend decision and openvino's "
                             "conversion of a model without `model.onnx` are kept (never in the model store); if it "
                             "cannot be written, a folder in the temporary directory", text(""))
    scores: str = setting("VIT_SCORES", "`calibrated`", "`calibrated`: scores are softmax(logits / T), T fitted at "
                          "export (docs/explain.md, Calibration; a model exported without one serves the plain softmax); "
                          "`raw`: the plain softmax. Top-1 and the order of the top-k are the same either way",
                          one_of("calibrated", "raw"))
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
    workers: int = setting("VIT_WORKERS", "host: 2 on CPU where memory allows, else 1; 1 on GPU",
                           "worker processes, each with the model (a second one keeps serving when one dies)",
                           integer(lambda host: 1 if host.gpu else _cpu_workers(host)))
    decode_threads: int = setting("VIT_DECODE_THREADS", "host: max(1, (cores / workers) // 4) on CPU, cores - 1 on GPU",
                                  "decoding threads per worker",
                                  integer(lambda host: max(1, host.cores - 1) if host.gpu else host.cores))  # see from_env
    torch_threads: int | None = setting("VIT_TORCH_THREADS", "host on CPU: cores / workers - decode threads; "
                                        "else torch's (one per core)",
                                        "intra-op threads of the model (torch and openvino)", read_optional_int)
    model_watch_s: int = setting("VIT_MODEL_WATCH_S", "10", "with a `:latest` tag, seconds between looks for a new "
                                 "version, which serves once loaded, warmed and checked (docs/serving.md, model "
                                 "updates); `0`: never", integer(10, minimum=0))
    drift_window: int = setting("VIT_DRIFT_WINDOW", "1000", "recent predictions each worker compares with the "
                                "model's validation reference (drift gauges on /metrics)", integer(1000))
    api_keys: tuple[bytes, ...] = setting("VIT_API_KEY", "unset: the API is open", "API key(s), comma-separated: "
                                          "requests then need `Authorization: Bearer <key>` (docs/serving.md, "
                                          "API keys)", read_key_list, repr=False)
    api_key_file_keys: tuple[bytes, ...] = setting("VIT_API_KEY_FILE", "unset", "a file of API keys, one a line "
                                                   "(`#` comments), added to `VIT_API_KEY`'s", read_key_file,
                                                   repr=False)
    protect_metrics: bool = setting("VIT_PROTECT_METRICS", "`0`", "`1`: `/metrics` needs an API key too",
                                    flag(False))
    cores: int = field(default=1)  # the host's, not a setting
    gpu: bool = field(default=False)  # VIT_DEVICE resolves to CUDA here

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        def raw(var: Variable) -> str:
            return environ.get(var.env, "").strip()

        variables = _variables()
        device = variables["device"].read(variables["device"].env, raw(variables["device"]), Host(False, 0))
        gpu = cuda_wanted(device)
        model_tag = variables["model_tag"].read(variables["model_tag"].env, raw(variables["model_tag"]), Host(gpu, 0))
        host = Host(gpu=gpu, cores=host_cores(), memory=None if gpu else available_memory(),
                    model_size=0 if gpu else model_bytes(model_tag))
        settings = cls(**{name: var.read(var.env, raw(var), host) for name, var in variables.items()},
                       cores=host.cores, gpu=gpu)
        if gpu:
            return settings
        # On a CPU each worker's share of the cores: a quarter decodes, the rest runs the model.
        share = max(1, host.cores // settings.workers)
        decode = settings.decode_threads if raw(variables["decode_threads"]) else max(1, share // 4)
        torch_threads = settings.torch_threads or max(1, share - decode)
        return replace(settings, decode_threads=decode, torch_threads=torch_threads)

    def describe(self) -> dict[str, object]:
        """What /model_info shows under "serving" about the process layout."""
        return {"workers": self.workers, "decode_threads": self.decode_threads, "torch_threads": self.torch_threads,
                "host_cores": self.cores, "api_keys": self.api_keys_enabled}

    @property
    def api_keys_enabled(self) -> bool:
        return bool(self.api_keys or self.api_key_file_keys)


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
