"""Which runtime and precision serve a model on this host: measured once, kept, read at every later start.

The candidates are listed most trusted first (torch fp32, the reference; torch bf16; OpenVINO fp32,
bf16, int8); each is timed against the best before it with `vit_service.host.faster` and takes its
place only if at least 10% faster (host.MIN_GAIN, the one rule). The verdict is written as JSON into
the cache folder, keyed by everything that makes it valid: the CPU model and the flags that matter,
the model version (`ModelSource.fingerprint`), the threads, the batch size limit, the settings asked
for and the runtimes' versions. A later start with the same key reads it (no timing); a start on
another CPU, or after any of those change, measures again. Workers starting together take a file
lock, so one measures and the others read its verdict: every worker serves the same choice.

The cache folder is VIT_CACHE_DIR, by default ~/.cache/vit-service (XDG_CACHE_HOME), never the
model store: BentoML models are immutable once saved, and a store may be read-only. Where the cache
folder cannot be written, a folder in the system's temporary directory is used instead, shared by
the workers of this host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_service.host import MIN_GAIN, CpuInfo, faster, host_cores

logger = logging.getLogger("bentoml.vit_service")
CACHE_ENV = "VIT_CACHE_DIR"
# Each race times batches of at most RACE_BATCH images within RACE_BUDGET_S seconds: the first start
# on a host measures 2-4 races; every later start reads the verdict.
RACE_BATCH = 8
RACE_BUDGET_S = 2.0


def cache_dir() -> Path:
    """VIT_CACHE_DIR, else $XDG_CACHE_HOME/vit-service (~/.cache/vit-service); where it cannot be
    made or written, vit-service-<uid> in the temporary directory (one per host user, so the
    workers still share it)."""
    configured = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vit-service")
    fallback = Path(tempfile.gettempdir()) / f"vit-service-{os.getuid()}"
    for path in (Path(configured), fallback):
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            pass
        if path != fallback:
            logger.warning("cache folder %s cannot be written: using %s", path, fallback)
    raise OSError(f"no writable cache folder ({configured} nor the temporary directory)")


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass
class Decision:
    """What was chosen and why, with the rates measured (images/s at `batch`) for /model_info."""
    backend: str
    precision: str
    reason: str
    rates_img_s: dict[str, float] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    batch: int = 0
    measured_at: str = ""
    key: dict[str, Any] = field(default_factory=dict)
    kept: str | None = None  # the file it was read from, or written to
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decision_key(cpu: CpuInfo, model: str, threads: int | None, max_batch_size: int, backend: str, precision: str,
                 versions: dict[str, str]) -> dict[str, Any]:
    return {"cpu": cpu.model, "flags": cpu.flags_that_matter, "model": model, "threads": threads or host_cores(),
            "max_batch_size": max_batch_size, "backend": backend, "precision": precision, "runtimes": versions}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def kept_or_measured(key: dict[str, Any], candidates: list[Candidate],
                     measure: Callable[[list[Candidate], int], Decision], batch: int,
                     folder: Path | None = None) -> Decision:
    """The decision kept for `key`, else one measured now by `measure(candidates, batch)` and kept."""
    folder = folder or cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = folder / "decisions" / f"{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            kept = json.loads(path.read_text())
            if kept.get("key") == key:
                return Decision(**{**kept, "kept": str(path), "reused": True})
        except (OSError, ValueError, TypeError):
            pass  # none yet, or unreadable: measure again
        decision = measure(candidates, batch)
        decision.key, decision.kept = key, str(path)
        decision.measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(decision.to_dict(), indent=1))
        os.replace(tmp, path)
        logger.info("backend decision for this host kept in %s: %s %s (%s)", path, decision.backend,
                    decision.precision, decision.reason)
        return decision


def race(predictors: dict[Candidate, Callable[[np.ndarray], Any]], x: np.ndarray,
         budget_s: float = RACE_BUDGET_S, clock: Callable[[], float] = time.perf_counter) -> Decision:
    """Times each candidate against the best before it (`faster`: >= MIN_GAIN faster to replace it)."""
    names = list(predictors)
    best = names[0]
    rates: dict[str, float] = {}
    verdicts: list[str] = []
    reason = ""
    for candidate in names[1:]:
        result = faster(lambda c=candidate: predictors[c](x), lambda b=best: predictors[b](x), budget_s=budget_s,
                        clock=clock)
        rates[candidate.label] = round(len(x) / result.candidate_s, 2)
        rates.setdefault(best.label, round(len(x) / result.baseline_s, 2))
        verdict = (f"{candidate.label} {result.baseline_s / result.candidate_s:.2f}x {best.label}: "
                   f"{'faster' if result else 'not faster'} by the >= {MIN_GAIN:.0%} rule")
        verdicts.append(verdict)
        if result:
            best, reason = candidate, verdict
    if best == names[0]:
        reason = (f"{best.label}: no candidate measured >= {MIN_GAIN:.0%} faster" if len(names) > 1
                  else f"{best.label}: the only candidate")
    return Decision(best.backend, best.precision, reason, rates, verdicts, len(x))

__all__ = ["CACHE_ENV", "Candidate", "Decision", "RACE_BATCH", "RACE_BUDGET_S", "cache_dir", "decision_key",
           "kept_or_measured", "race"]
