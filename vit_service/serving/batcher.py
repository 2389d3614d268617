"""In-process adaptive batching: forward at once when the model is idle, batch what queues meanwhile.

BentoML's batcher (used in the split mode) fits a latency model and may hold a request back to
grow a batch. Here the rule is simpler and adds no wait: when no forward pass is running, the
next one starts immediately with whatever is queued (one request at one client); while it runs,
new requests queue, and the next pass takes them all, up to `max_batch_size` images. The batch
size thus follows the load by itself. The forward pass runs in one dedicated thread (torch
releases the GIL), so the event loop keeps parsing uploads while the model works.

Written by hand because BentoML's batcher lives in its model service, behind an HTTP hop, and we
want the same batching without the hop when model and front share a process.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class Overloaded(Exception):
    """A request waited in the queue longer than the latency limit; answered with 503."""


@dataclass(frozen=True)
class BatchTiming:
    queue_s: float  # waited for the model
    forward_s: float  # the forward pass this request was part of
    batch_size: int  # images in that pass


@dataclass
class _Pending:
    images: np.ndarray  # (n, 3, S, S) uint8
    future: asyncio.Future[tuple[np.ndarray, BatchTiming]]
    queued_at: float


class AdaptiveBatcher:
    """`await batcher(images)` -> (probabilities, timing); `forward` is called with (B, ...) arrays."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch_size: int,
                 max_latency_s: float, on_batch: Callable[[int], None] | None = None) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.on_batch = on_batch or (lambda size: None)
        self._queue: deque[_Pending] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward")

    async def __call__(self, images: np.ndarray) -> tuple[np.ndarray, BatchTiming]:
        loop = asyncio.get_running_loop()
        pending = _Pending(images, loop.create_future(), time.perf_counter())
        self._queue.append(pending)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await pending.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch = self._take()
            if not batch:
                continue
            start = time.perf_counter()
            try:
                stacked = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
                probs = await loop.run_in_executor(self._thread, self.forward, stacked)  # (B, K)
            except Exception as e:  # the pass failed: every request in it learns why
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            forward_s = time.perf_counter() - start
            self.on_batch(len(stacked))
            offset = 0
            for p in batch:
                n = len(p.images)
                if not p.future.done():  # its client may have gone (cancelled)
                    p.future.set_result((probs[offset:offset + n], BatchTiming(start - p.queued_at, forward_s, len(stacked))))
                offset += n

    def _take(self) -> list[_Pending]:
        """The next batch: queued requests in order, up to max_batch_size images (at least one
        request, however many images it has). Requests past the latency limit fail with 503."""
        now = time.perf_counter()
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # cancelled while queued
                self._queue.popleft()
                continue
            if now - p.queued_at > self.max_latency_s:
                self._queue.popleft()
                p.future.set_exception(Overloaded())
                continue
            if batch and size + len(p.images) > self.max_batch_size:
                break
            self._queue.popleft()
            batch.append(p)
            size += len(p.images)
        return batch

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
