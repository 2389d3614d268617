"""Service settings: environment variables read once at start-up, defaults derived from the host.

Defaults follow the host's CPU cores and device (see bench/README.md, "GPU on paper"):
    CPU only  VIT_MODE=inprocess: the model runs in the front process behind an in-process
              batcher. 1 worker (a second would hold a second model and fight for the same
              cores), decode threads = cores, max batch 16 (the CPU's best raw batch).
    CUDA      VIT_MODE=split: a model service owns the GPU, front workers decode. The GPU does
              thousands of images/s and one core decodes ~100-200 photos/s, so every core but one
              (left to the model process) runs a front worker with 2 decode threads; max batch 64.
Any variable set overrides its derived default; a bad value is a start-up error naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from vit_service.preprocessing import DEFAULT_MAX_PIXELS
from vit_service.serving.store import DEFAULT_MODEL_TAG

Mode = Literal["inprocess", "split"]
MODES = ("auto", "inprocess", "split")


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


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
    model_tag: str
    device: str
    precision: str
    compile_mode: str | None
    mode: Mode
    batching: bool
    max_batch_size: int
    max_latency_ms: int
    max_images: int
    max_body_bytes: int
    max_image_pixels: int
    jpeg_draft: bool
    timeout: int
    max_concurrency: int
    workers: int
    decode_threads: int
    torch_threads: int | None  # None: torch's default (one per core)
    cores: int

    @classmethod
    def from_env(cls) -> Settings:
        compile_env = os.environ.get("VIT_COMPILE", "0").strip()
        device = os.environ.get("VIT_DEVICE", "").strip() or "auto"
        mode_env = os.environ.get("VIT_MODE", "").strip() or "auto"
        if mode_env not in MODES:
            raise ValueError(f"VIT_MODE must be one of {', '.join(MODES)}, got {mode_env!r}")
        gpu = cuda_wanted(device)
        mode: Mode = ("split" if gpu else "inprocess") if mode_env == "auto" else mode_env  # type: ignore[assignment]
        cores = host_cores()
        if gpu:
            workers, decode_threads, max_batch = max(1, cores - 1), 2, 64
        else:
            workers, decode_threads, max_batch = 1, cores, 16
        torch_threads = os.environ.get("VIT_TORCH_THREADS", "").strip()
        return cls(
            model_tag=os.environ.get("VIT_MODEL_TAG", "").strip() or DEFAULT_MODEL_TAG,
            device=device,
            precision=os.environ.get("VIT_PRECISION", "").strip() or "auto",
            compile_mode=None if compile_env in ("", "0") else ("default" if compile_env == "1" else compile_env),
            mode=mode,
            batching=_env_flag("VIT_BATCHING", True),
            # BentoML's batcher requires max_batch_size > 1.
            max_batch_size=_env_int("VIT_MAX_BATCH_SIZE", max_batch, minimum=2),
            max_latency_ms=_env_int("VIT_MAX_LATENCY_MS", 2000),
            max_images=_env_int("VIT_MAX_IMAGES_PER_REQUEST", 32),
            max_body_bytes=_env_int("VIT_MAX_BODY_BYTES", 32 * 2**20),
            max_image_pixels=_env_int("VIT_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS),
            jpeg_draft=_env_flag("VIT_JPEG_DRAFT", True),
            timeout=_env_int("VIT_TIMEOUT", 30),
            max_concurrency=_env_int("VIT_MAX_CONCURRENCY", 64),
            workers=_env_int("VIT_WORKERS", workers),
            decode_threads=_env_int("VIT_DECODE_THREADS", decode_threads),
            torch_threads=_env_int("VIT_TORCH_THREADS", 1) if torch_threads else None,
            cores=cores,
        )

    def describe(self) -> dict[str, object]:
        """What /model_info shows under "serving" about the process layout."""
        return {"mode": self.mode, "workers": self.workers, "decode_threads": self.decode_threads,
                "torch_threads": self.torch_threads, "host_cores": self.cores}
