"""One model handle per mode, with the same async methods; the front picks one at start-up.

    InProcessModel  VIT_MODE=inprocess: the model in the front process, behind the in-process
                    adaptive batcher (batcher.py); /explain in its own single thread beside it.
    RemoteModel     VIT_MODE=split: the model service (model_service.ViTModel) through
                    `bentoml.depends`, with retries on dropped connections and its errors mapped
                    to the front's 503/504.

Routes call `predict`, `explain`, `describe` and `ready` and never ask which mode they are in.
Failures the client should see raise `RequestError` (503 overloaded or warming up, 504 timeout).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx
import numpy as np

from vit_service.preprocessing import Preprocessing
from vit_service.serving import local_model, metrics
from vit_service.serving.batcher import AdaptiveBatcher, Overloaded
from vit_service.serving.bentoml_compat import keep_one_session
from vit_service.serving.errors import NOT_READY, OVERLOADED, TIMED_OUT, RequestError
from vit_service.serving.settings import Settings

logger = logging.getLogger("bentoml.vit_service")


@dataclass(frozen=True)
class ModelInfo:
    description: dict[str, Any]  # what /model_info shows, before the front adds its own limits
    class_names: list[str]
    preprocessing: Preprocessing

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> ModelInfo:
        return cls(description, list(description["class_names"]), Preprocessing.from_dict(description["preprocessing"]))


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


class InProcessModel:
    """The model in this process. Loads at once; warms up in the background, so /readyz answers
    503 meanwhile (and stays 503, with the reason in the log, if the warm-up fails)."""

    def __init__(self, settings: Settings, model_path: str, tag: Any) -> None:
        predictor = local_model.load_predictor(settings, model_path)
        self.explainer = local_model.make_explainer(predictor, model_path)
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="explain")  # beside, never inside, the batcher
        self.batcher = AdaptiveBatcher(predictor.predict_proba,
                                       max_batch_size=settings.max_batch_size if settings.batching else 1,
                                       max_latency_s=settings.max_latency_ms / 1000, on_batch=metrics.batch_size.observe)
        self._info: ModelInfo | None = None
        self.warm = threading.Event()

        def warm() -> None:
            try:
                local_model.warm_up(predictor, settings, tag)
            except Exception:
                logger.exception("warm-up of %s failed; the service stays unready", tag)
                return
            self._info = ModelInfo.from_description(local_model.describe_model(predictor, settings, tag))
            self.warm.set()

        threading.Thread(target=warm, name="warmup", daemon=True).start()

    async def describe(self) -> ModelInfo:
        if self._info is None:
            raise RequestError(503, NOT_READY, "not_ready")
        return self._info

    async def ready(self) -> bool:
        return self.warm.is_set()

    async def predict(self, batch: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        try:
            probs, timing = await self.batcher(batch)
        except Overloaded:
            raise RequestError(503, OVERLOADED, "overloaded") from None
        timings["queue"], timings["forward"] = timing.queue_s, timing.forward_s
        return probs

    async def explain(self, pixels: np.ndarray, method: str, class_index: int | None) -> Explained:
        loop = asyncio.get_running_loop()
        probs, target, maps = await loop.run_in_executor(
            self.explain_pool, self.explainer.explain_uint8, pixels, method, class_index)
        return Explained(np.asarray(probs[0], np.float32), int(target[0]), np.asarray(maps[0], np.float32))


# Errors of the inter-service client: aiohttp in BentoML >= 1.4.30 (proxy2), httpx before.
# Timeouts first: aiohttp's ServerTimeoutError is also a connection error.
_TIMEOUTS = (TimeoutError, httpx.TimeoutException)
_DISCONNECTS = (aiohttp.ClientConnectionError, httpx.TransportError)
MODEL_CALL_ATTEMPTS = 3


class RemoteModel:
    """The split-mode model service, reached through its `bentoml.depends` client."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._info: ModelInfo | None = None
        keep_one_session(service)

    async def describe(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.from_description(await self.service.to_async.info())
        return self._info

    async def ready(self) -> bool:
        # Until the model service answers, a call to it hangs in its socket's backlog: a short bound.
        try:
            await asyncio.wait_for(self.describe(), timeout=2)
        except Exception:
            return False
        return True

    async def predict(self, batch: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        from bentoml.exceptions import BentoMLException

        start = time.perf_counter()
        try:
            for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
                try:
                    return await self.service.to_async.predict(batch)
                except BentoMLException as e:
                    status = int(e.error_code)
                    if status in (429, 503):
                        raise RequestError(503, OVERLOADED, "overloaded") from None
                    if status == 504:
                        raise RequestError(504, TIMED_OUT) from None
                    raise
                except _TIMEOUTS:
                    raise RequestError(504, TIMED_OUT) from None
                except _DISCONNECTS as e:
                    # A dropped connection to the model service: its worker restarted, or BentoML's
                    # client closed its session under this call (see keep_one_session). predict is
                    # idempotent, so call again.
                    logger.info("model call failed (%r), attempt %d of %d", e, attempt, MODEL_CALL_ATTEMPTS)
            raise RequestError(503, "the model service is unavailable; retry shortly")
        finally:
            timings["hop"] = time.perf_counter() - start

    async def explain(self, pixels: np.ndarray, method: str, class_index: int | None) -> Explained:
        from bentoml.exceptions import BentoMLException

        try:
            result = await self.service.to_async.explain(pixels, method=method, class_index=class_index)
        except BentoMLException as e:
            logger.warning("explain call failed: %r", e)
            if int(e.error_code) == 504:
                raise RequestError(504, TIMED_OUT) from None
            raise RequestError(503, "the model service could not explain this image now; retry shortly") from None
        except TimeoutError:
            raise RequestError(504, TIMED_OUT) from None
        return Explained(np.asarray(result["probs"], np.float32), int(result["class_index"]),
                         np.asarray(result["grid"], np.float32))


# ------------------------------------------------------------------ the one mode switch

def model_dependency(settings: Settings) -> Any:
    """For the front's class scope: `bentoml.depends(ViTModel)` in split mode (BentoML then starts
    the model service), else None."""
    if settings.mode != "split":
        return None
    import bentoml

    from vit_service.serving.model_service import ViTModel

    return bentoml.depends(ViTModel)


def open_model(settings: Settings, model_path: str, tag: Any, dependency: Any) -> ModelHandle:
    """The handle for this process: the model service when there is one, else the model here."""
    return RemoteModel(dependency) if dependency is not None else InProcessModel(settings, model_path, tag)
