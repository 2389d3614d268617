"""`trainer.precision: auto`: the fastest training precision on this host, resolved before the
Trainer is built (training/cli.py) and saved in the run's config.yaml as the value it resolved to.

    CUDA with bf16 (Ampere and later)   bf16-mixed
    CUDA without bf16                   32-true (fp16 needs loss scaling; ask for 16-mixed by name)
    CPU with AVX512-BF16 or AMX         bf16-mixed only if one training step of the configured
                                        model, timed for a few seconds, is at least 10% faster
                                        under bf16 autocast (vit_service.host.faster); else 32-true
    CPU without them                    32-true, without timing: oneDNN emulates bf16 there and
                                        autocast is several times slower (bench/README.md,
                                        "The AVX2-only host, measured")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from training.runs import rank_zero_decides
from vit_service.formats.sources import build_model_config
from vit_service.host import CpuInfo, Race, cpu_can_accelerate_bf16, faster, read_cpu

log = logging.getLogger(__name__)

AUTO = "auto"
PRECISION_ENV = "VIT_TRAIN_RESOLVED_PRECISION"  # rank 0's choice, inherited by the DDP processes it starts
TIMING_BUDGET_S = 3.0
TOKENS_PER_TIMING_BATCH = 2048  # batch = this / tokens per image (31 CIFAR images, 3 at 384 px): the bf16
# gain shows at this size, not at 512 tokens, and a step stays short on an idle core (bench/README.md,
# "CIFAR-10 train step: fp32 vs bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # a Lightning precision value: "bf16-mixed" or "32-true"
    reason: str
    timings_s: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        t = ", ".join(f"{k} {v:.3f} s" for k, v in self.timings_s.items())
        return f"precision auto -> {self.precision} ({self.reason}{'; one step: ' + t if t else ''})"


def choose_precision(*, use_cuda: bool, cuda_bf16: bool, cpu: CpuInfo,
                     race_bf16: Callable[[], Race]) -> PrecisionChoice:
    """The decision; `race_bf16()` times a bf16 step against fp32 and is called only on a CPU that
    has bf16 instructions (tests pass fake flags and fake races)."""
    if use_cuda:
        if cuda_bf16:
            return PrecisionChoice("bf16-mixed", "CUDA with bf16")
        return PrecisionChoice("32-true", "CUDA without bf16")
    if not cpu_can_accelerate_bf16(cpu):
        return PrecisionChoice("32-true", f"CPU {cpu.model} has no avx512_bf16/amx: bf16 not timed")
    race = race_bf16()
    timings = race.timings("bf16", "fp32")
    if race.won:
        return PrecisionChoice("bf16-mixed", "bf16 measured >= 10% faster on this CPU", timings)
    return PrecisionChoice("32-true", "bf16 not measured >= 10% faster on this CPU", timings)


def race_train_step(model_config, batch_size: int, budget_s: float = TIMING_BUDGET_S) -> Race:
    """One forward + backward (no optimizer step) of `model_config` on random weights and images,
    bf16 autocast against fp32, on one CPU thread timed by that thread's CPU clock: on a shared
    machine wall time measures the neighbours (a 2-thread timing under load average 10 here gave
    fp32 6.9 s, bf16 7.7 s a step, the reverse of the quiet ratio), the thread's CPU time does not.
    The budget is wall time."""
    import time

    import torch
    import torch.nn.functional as F

    from vit_service.model import VisionTransformer

    model = VisionTransformer(model_config).train()
    tokens = (model_config.image_size // model_config.patch_size) ** 2 + 1
    n = max(2, min(batch_size, 32, TOKENS_PER_TIMING_BATCH // tokens))
    S = model_config.image_size
    x = torch.randn(n, model_config.in_chans, S, S)
    y = torch.randint(0, max(model_config.num_classes, 1), (n,))

    def step(dtype: torch.dtype | None) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return faster(step(torch.bfloat16), step(None), budget_s=budget_s, clock=time.thread_time,
                      budget_clock=time.perf_counter)
    finally:
        torch.set_num_threads(threads)


def resolve_auto_precision(accelerator: str | None, model_config_fn: Callable[[], object], batch_size: int,
                           cpu: CpuInfo | None = None) -> PrecisionChoice:
    """`trainer.precision: auto` for a run on `accelerator` (auto, cpu, gpu, cuda, ...)."""
    import torch

    use_cuda = (accelerator or "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return choose_precision(
        use_cuda=use_cuda, cuda_bf16=use_cuda and torch.cuda.is_bf16_supported(), cpu=cpu or read_cpu(),
        race_bf16=lambda: race_train_step(model_config_fn(), batch_size))


def resolve_config_precision(config: Any) -> str:
    """`trainer.precision: auto` in a parsed vit-train config -> a Lightning precision. Rank 0
    decides (and prints it, once); DDP processes that Lightning starts inherit its choice, so all
    ranks train alike."""
    model, data = config["model"], config["data"]

    def model_config() -> Any:
        return build_model_config(model["preset"], model.get("num_classes") or 10, model.get("image_size"),
                                  model.get("model_overrides"), model.get("init_from"))

    def decide() -> str:
        choice = resolve_auto_precision(config["trainer"].get("accelerator"), model_config,
                                        int(data.get("batch_size") or 32))
        log.info(choice.line())
        return choice.precision

    return rank_zero_decides(PRECISION_ENV, decide)


__all__ = ["AUTO", "PRECISION_ENV", "resolve_config_precision", "PrecisionChoice", "choose_precision", "race_train_step", "resolve_auto_precision"]
