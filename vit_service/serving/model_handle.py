"""The model behind the routes: `ModelHandle` is what they call, `InProcessModel` the one there is.

Routes call `predict`, `explain`, `describe` and `ready` and never ask where the model runs, so a
GPU model service can come back as a second handle where a GPU run shows it wins. Failures the
client should see raise `RequestError` (503 overloaded or warming up).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vit_service.backends import Predictor
from vit_service.preprocessing import Preprocessing
from vit_service.serving import metrics, restarts
from vit_service.serving.bentoml_compat import worker_index
from vit_service.serving.batcher import AdaptiveBatcher, Overloaded
from vit_service.serving.drift import DriftWindow
from vit_service.serving.errors import NOT_READY, OVERLOADED, RequestError
from vit_service.serving.settings import Settings

logger = logging.getLogger("bentoml.vit_service")


@dataclass(frozen=True)
class ModelInfo:
    description: dict[str, Any]  # what /model_info shows, before the front adds its own limits
    class_names: list[str]
    preprocessing: Preprocessing


@dataclass(frozen=True)
class Explained:
    probs: np.ndarray  # (K,) float32
    class_index: int  # the class the map explains
    grid: np.ndarray  # (Gh, Gw) in [0, 1]


class ModelHandle(Protocol):
    async def describe(self) -> ModelInfo:
        """The model's description; RequestError(503) until it is ready."""

    async def ready(self) -> bool:
        """For /readyz: whether requests can be served now."""

    async def predict(self, batch: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        """(B, 3, S, S) uint8 -> (B, K) probabilities; adds its stages to `timings`."""

    async def explain(self, pixels: np.ndarray, method: str, class_index: int | None) -> Explained:
        """(1, 3, S, S) uint8 -> the attention map of `class_index` (None: the top class)."""

    def drift_status(self) -> dict[str, Any]:
        """For /model_info: the recent predictions against the validation reference (drift.py)."""


class InProcessModel:
    """The model in this worker, behind the adaptive batcher; /explain in its own single thread
    beside it. Loads at once; worker 1 (when no sibling serves) warms up in the background, so
    /readyz answers 503 meanwhile (and stays 503, with the reason in the log, if the warm-up
    fails); any other worker warms up before it takes a connection (restarts.py)."""

    def __init__(self, settings: Settings, model_path: str, tag: Any, replacement: bool = False) -> None:
        """`replacement`: a new version loaded beside the serving one (model_updates.py): warmed up
        here, in the caller's thread, and a failed warm-up raises instead of leaving it unready."""
        predictor = load_predictor(settings, model_path)
        self._explainer: Any = None  # made at the first /explain, on the predictor's one torch model
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="explain")  # beside, never inside, the batcher
        self.batcher = AdaptiveBatcher(predictor.predict_proba,
                                       max_batch_size=settings.max_batch_size if settings.batching else 1,
                                       max_latency_s=settings.max_latency_ms / 1000, on_batch=metrics.batch_size.observe)
        # The reference holds calibrated scores: served raw (VIT_SCORES=raw) they would not compare.
        reference = predictor.artifact.reference
        calibration = predictor.artifact.calibration
        comparable = settings.scores == "calibrated" or not calibration or calibration.get("temperature") == 1.0
        self.drift = DriftWindow(reference, settings.drift_window) if reference and comparable else None
        self.no_drift = ("the model was exported without a validation reference (re-export it with this version's "
                         "vit-export)" if not reference else "VIT_SCORES=raw: the reference holds calibrated scores")
        self.tag = str(tag)
        self._predictor = predictor
        self._info: ModelInfo | None = None
        self.warm = threading.Event()
        self.failed = False
        self.wait_s = settings.timeout
        self.workers = settings.workers

        def warm() -> None:
            try:
                warm_up(predictor, settings, tag)
            except Exception:
                logger.exception("warm-up of %s failed; the service stays unready", tag)
                self.failed = True
                return
            description = describe_model(predictor, settings, tag)
            self._info = ModelInfo(description, list(predictor.artifact.class_names), predictor.preprocessing)
            self.warm.set()
            restarts.mark_warm()

        if replacement:
            warm_up(predictor, settings, tag)
            self._info = ModelInfo(describe_model(predictor, settings, tag), list(predictor.artifact.class_names),
                                   predictor.preprocessing)
            self.warm.set()
            self._smoke_test(predictor)
        elif restarts.warm_in_background(self.workers):  # the one worker that answers 503 (and /readyz 503) meanwhile
            threading.Thread(target=warm, name="warmup", daemon=True).start()
        else:  # another worker answers: take no connection before warm
            logger.info("warming up before accepting connections (worker %d)", worker_index())
            warm()

    @property
    def serving(self) -> tuple[str, str]:
        """(backend, precision) that serve: VIT_BACKEND=auto's choice is known once warm."""
        return self._predictor.backend, self._predictor.precision

    def explainer(self) -> Any:
        """The /explain engine, made on first use (in the explain thread) on the predictor's torch
        model: the runtime's own for torch, loaded once beside another runtime (backends/base.py)."""
        if self._explainer is None:
            from vit_service.explain import Explainer

            p = self._predictor
            self._explainer = Explainer(p.model, p.artifact, p.device, calibrated=p.calibrated)
        return self._explainer

    @staticmethod
    def _smoke_test(predictor: Predictor) -> None:
        """A prediction before the first request: probabilities of every class, finite, summing to 1."""
        probs = predictor.predict_proba(np.zeros((2, *predictor.input_shape), np.uint8))  # (2, K)
        k = len(predictor.artifact.class_names)
        if probs.shape != (2, k) or not np.isfinite(probs).all() or not np.allclose(probs.sum(1), 1, atol=1e-3):
            raise ValueError(f"smoke prediction failed: shape {probs.shape} for {k} classes, finite "
                             f"{bool(np.isfinite(probs).all())}, sums {probs.sum(1).round(4).tolist()}")

    def close(self) -> None:
        """Stops the threads of a version that no longer serves (its last requests have ended)."""
        self.batcher.close()
        self.explain_pool.shutdown(wait=False)

    def drift_status(self) -> dict[str, Any]:
        """What /model_info shows under "drift": this worker's window, or why there is none."""
        if self.drift is None:
            return {"available": False, "reason": self.no_drift}
        return {"available": True, "window": self.drift.count, "window_size": self.drift.size,
                "reference": self.drift.reference, "current": self.drift.gauges()}

    async def describe(self) -> ModelInfo:
        if self._info is None and not self.failed and restarts.sibling_serving(self.workers):
            # Another worker already serves, so /readyz said ready: this cold one (worker 1, warming
            # in the background at the first start) holds the request until it is warm, not a 503.
            deadline = asyncio.get_running_loop().time() + self.wait_s
            while self._info is None and not self.failed and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        if self._info is None:
            raise RequestError(503, NOT_READY, "not_ready")
        return self._info

    async def ready(self) -> bool:
        # Ready when warm, or while warming if another worker serves (requests here then wait).
        return self.warm.is_set() or (not self.failed and restarts.sibling_serving(self.workers))

    async def predict(self, batch: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        try:
            probs, timing = await self.batcher(batch)
        except Overloaded:
            raise RequestError(503, OVERLOADED, "overloaded") from None
        timings["queue"], timings["forward"] = timing.queue_s, timing.forward_s
        if self.drift is not None:
            self.drift.observe(probs)
            metrics.observe_drift(self.tag, self.drift.count, self.drift.gauges())
        return probs

    async def explain(self, pixels: np.ndarray, method: str, class_index: int | None) -> Explained:
        loop = asyncio.get_running_loop()
        probs, target, maps = await loop.run_in_executor(
            self.explain_pool, lambda: self.explainer().explain_uint8(pixels, method, class_index))
        return Explained(np.asarray(probs[0], np.float32), int(target[0]), np.asarray(maps[0], np.float32))


def load_predictor(settings: Settings, model_path: str) -> Predictor:
    """The exported model (its runtime chosen at warm-up), with the configured threads and backend."""
    from vit_service.backends import load_backend

    threads = settings.torch_threads  # the rule in settings.py: decode + model threads <= cores
    if threads:
        import torch

        torch.set_num_threads(threads)
    return load_backend(model_path, backend=settings.backend, device=settings.device, precision=settings.precision,
                        compile_mode=settings.compile_mode, threads=threads, calibrated=settings.scores == "calibrated",
                        cache=Path(settings.cache_dir) if settings.cache_dir else None)


def warm_up(predictor: Predictor, settings: Settings, tag: Any) -> None:
    seconds = predictor.warmup(settings.max_batch_size)
    logger.info("model %s ready on %s in %.1f s", tag, predictor.describe(), seconds)


def describe_model(predictor: Predictor, settings: Settings, tag: Any) -> dict[str, Any]:
    """What /model_info shows of the model and how it is served."""
    import torch

    artifact = predictor.artifact
    S = artifact.preprocessing.image_size
    return {
        "model_tag": str(tag),
        "class_names": list(artifact.class_names),
        "num_classes": len(artifact.class_names),
        "input_size": [3, S, S],
        "preprocessing": artifact.preprocessing.to_dict(),
        "model_config": artifact.config.to_dict(),
        # Keys starting with "_" (e.g. Lightning's "_instantiator") are internal.
        "metadata": {k: v for k, v in artifact.metadata.items() if not str(k).startswith("_")},
        # torch_threads: the intra-op threads torch really uses in this process (VIT_TORCH_THREADS).
        "serving": {**predictor.describe(), "worker": worker_index(), "torch_threads": torch.get_num_threads(), "batching": settings.batching,
                    "max_batch_size": settings.max_batch_size, "max_latency_ms": settings.max_latency_ms},
    }
