"""Adaptive batching in each worker, by BentoML's own batcher: `await batcher(images)` -> (probs, timing).

BentoML batches a batchable API's HTTP calls with its CorkDispatcher; the model here runs in the
worker that parsed the request, so the same dispatcher is driven in process (bentoml_compat.py).
It forwards at once when the model is idle, merges what queues during a forward pass into the
next one (up to `max_batch_size` images, splitting a request that does not fit and joining its
rows again), learns how long a pass takes, and cancels a request that would wait past the latency
limit (`Overloaded`, answered 503). The forward pass runs in one dedicated thread (torch releases
the GIL), so the event loop keeps parsing uploads while the model works. Why BentoML's and not
a hand-written one: bench/README.md, "Batching".
With batching off (`max_batch_size` 1) every request is one forward pass, in arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vit_service.serving.bentoml_compat import cork_dispatcher


class Overloaded(Exception):
    """A request would have waited in the queue past the latency limit; answered with 503."""


@dataclass(frozen=True)
class BatchTiming:
    queue_s: float  # waited for the model
    forward_s: float  # the forward pass this request was (last) part of
    batch_size: int  # images in that pass


class AdaptiveBatcher:
    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch_size: int,
                 max_latency_s: float, on_batch: Callable[[int], None] | None = None) -> None:
        self.forward = forward  # (B, 3, S, S) uint8 -> (B, K) probabilities
        self.max_latency_s = max_latency_s
        self.on_batch = on_batch or (lambda size: None)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._last = BatchTiming(0.0, 0.0, 0)
        self._started: dict[int, tuple[float, BatchTiming]] = {}  # the last pass's requests: id -> (start, timing)
        self.max_batch_size = max_batch_size
        self._dispatch: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the dispatcher's: it keeps its loop

    async def __call__(self, images: np.ndarray) -> tuple[np.ndarray, BatchTiming]:
        queued = time.perf_counter()
        if self.max_batch_size <= 1:
            [probs] = await self._run([images])
        else:
            if self._loop is not asyncio.get_running_loop():
                self._loop = asyncio.get_running_loop()
                self._dispatch = cork_dispatcher(self._run, round(self.max_latency_s * 1000), self.max_batch_size,
                                                 Overloaded)
            probs = await self._dispatch(images)  # type: ignore[misc]
        # A request split over two passes is not among the last pass's: it gets that pass's timing.
        start, timing = self._started.get(id(images), (queued + self._last.forward_s, self._last))
        return probs, BatchTiming(max(0.0, start - queued), timing.forward_s, timing.batch_size)

    async def _run(self, requests: Sequence[np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        batch = requests[0] if len(requests) == 1 else np.concatenate(requests)  # (B, 3, S, S)
        probs = await asyncio.get_running_loop().run_in_executor(self._thread, self.forward, batch)  # (B, K)
        self._last = BatchTiming(0.0, time.perf_counter() - start, len(batch))
        self.on_batch(len(batch))
        self._started = {id(r): (start, self._last) for r in requests}
        bounds = np.cumsum([0, *(len(r) for r in requests)])
        return [probs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def close(self) -> None:
        self._thread.shutdown(wait=False)
