"""What this host can do fast, read from the host itself: every "faster here" decision starts here.

    read_cpu()                 CPU model and the flags that matter (avx2, avx512f, avx512_bf16,
                               avx512_vnni, amx_bf16, amx_tile), from /proc/cpuinfo
    cpu_can_accelerate_bf16()  bf16 has hardware (AVX512-BF16 or AMX) or it is emulated, 2-5x slower
    faster()                   times a candidate against a baseline in a short budget; the candidate
                               wins only if at least MIN_GAIN (10%) faster: the one rule for bf16 vs
                               fp32, onnxruntime vs torch, int8 vs fp32, in training and serving
    describe_host()            {"cpu", "flags", "cores", "cuda"} for benchmarks and /model_info

Nothing here imports torch at module level: the decisions read flags before any timing, and a host
without the flags never pays for timing a precision it cannot accelerate.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
# The flags that decide what is fast on a CPU (names as Linux spells them in /proc/cpuinfo).
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
MIN_GAIN = 0.10  # a candidate must be at least 10% faster than the baseline to replace it


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def flags_that_matter(self) -> list[str]:
        return [f for f in FLAGS_THAT_MATTER if f in self.flags]


def read_cpu(text: str | None = None) -> CpuInfo:
    """The first CPU's model name and flags; `text` stands in for /proc/cpuinfo (tests, other hosts).
    A host without /proc/cpuinfo (macOS, Windows) reads as an unknown CPU with no flags."""
    if text is None:
        try:
            text = CPUINFO.read_text()
        except OSError:
            import platform

            return CpuInfo(platform.processor() or platform.machine() or "unknown")
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm64
            flags = frozenset(value.split())
        if model != "unknown" and flags:
            break
    return CpuInfo(model, flags)


def cpu_can_accelerate_bf16(flags: frozenset[str] | set[str] | CpuInfo) -> bool:
    """Whether bf16 matmuls run in hardware: AVX512-BF16 or AMX. Without them oneDNN emulates bf16
    and autocast is slower than fp32 (5.4x measured on an AVX2-only EPYC), so it is never timed."""
    flags = flags.flags if isinstance(flags, CpuInfo) else flags
    return any(f in flags for f in BF16_FLAGS)


def host_cores() -> int:
    """CPU cores this process may run on (a container's CPU set, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def importable(*names: str) -> bool:
    """Whether every named package imports here (optional runtimes: onnx, onnxruntime, ...)."""
    try:
        for name in names:
            __import__(name)
    except ImportError:
        return False
    return True


def cuda_info() -> dict[str, Any] | None:
    """The first CUDA device's name and bf16 support, or None without CUDA (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "bf16": bool(torch.cuda.is_bf16_supported())}


def describe_host(cpuinfo_text: str | None = None) -> dict[str, Any]:
    """{"cpu": model, "flags": [...the ones that matter], "cores": n, "cuda": {...} or None}."""
    cpu = read_cpu(cpuinfo_text)
    return {"cpu": cpu.model, "flags": cpu.flags_that_matter, "cores": host_cores(), "cuda": cuda_info()}


def host_line(host: dict[str, Any] | None = None) -> str:
    """One line for a benchmark's output: 'host: AMD EPYC, 2 cores, avx2 avx512f avx512_bf16, no CUDA'."""
    h = host or describe_host()
    cuda = f"CUDA {h['cuda']['name']}" if h.get("cuda") else "no CUDA"
    return f"host: {h['cpu']}, {h['cores']} cores, {' '.join(h['flags']) or 'no flags that matter'}, {cuda}"


def is_faster(candidate_s: float, baseline_s: float, min_gain: float = MIN_GAIN) -> bool:
    """The rule: the candidate takes at most (1 - min_gain) of the baseline's time."""
    return candidate_s <= (1.0 - min_gain) * baseline_s


@dataclass(frozen=True)
class Race:
    """The outcome of `faster`: median seconds per call of each, and whether the candidate won."""
    candidate_s: float
    baseline_s: float
    won: bool
    rounds: int

    def __bool__(self) -> bool:
        return self.won

    def timings(self, candidate: str, baseline: str) -> dict[str, float]:
        return {baseline: round(self.baseline_s, 4), candidate: round(self.candidate_s, 4)}


def faster(candidate: Callable[[], Any], baseline: Callable[[], Any], min_gain: float = MIN_GAIN,
           budget_s: float = 3.0, max_rounds: int = 5,
           clock: Callable[[], float] = time.perf_counter,
           budget_clock: Callable[[], float] | None = None) -> Race:
    """Times `candidate()` against `baseline()`: one untimed call of each (allocator, kernels,
    caches), then alternating timed rounds (so a load spike on a shared machine hits both alike)
    until `budget_s` is spent (at least one round, at most `max_rounds`); medians compared with
    `is_faster`. Keep each call short: the budget is checked between rounds, not inside a call.

    `clock` times the calls: wall time by default; `time.thread_time` (with one compute thread)
    counts only the CPU the call itself used, which other jobs on a shared machine barely change.
    `budget_clock` (default: `clock`) measures the budget; pass time.perf_counter to bound wall time."""
    budget_clock = budget_clock or clock
    start = budget_clock()
    baseline()
    candidate()
    samples: dict[str, list[float]] = {"candidate": [], "baseline": []}
    calls = {"candidate": candidate, "baseline": baseline}
    rounds = 0
    while rounds < max_rounds:
        order = ("baseline", "candidate") if rounds % 2 == 0 else ("candidate", "baseline")
        for name in order:
            t0 = clock()
            calls[name]()
            samples[name].append(clock() - t0)
        rounds += 1
        spent = budget_clock() - start
        per_round = (spent / (rounds + 1))  # the untimed calls count as one round
        if spent + per_round > budget_s:
            break
    c, b = statistics.median(samples["candidate"]), statistics.median(samples["baseline"])
    return Race(c, b, is_faster(c, b, min_gain), rounds)


__all__ = ["BF16_FLAGS", "CpuInfo", "FLAGS_THAT_MATTER", "MIN_GAIN", "Race", "cpu_can_accelerate_bf16",
           "cuda_info", "describe_host", "faster", "host_cores", "host_line", "importable", "is_faster", "read_cpu"]
