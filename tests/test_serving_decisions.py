"""The serving decisions as unit tests, on given inputs instead of the host and the clock:

- the batcher (batcher.py, BentoML's CorkDispatcher in process): a request that finds the model
  idle is forwarded at once, requests that queue during a pass merge into the next one up to the
  batch-size cap (a request split across passes gets its rows back whole), a gated forward pass;
- VIT_BATCHING=0 and VIT_MAX_LATENCY_MS (503 past it, the batcher's clock moved on) through the
  real InProcessModel on the tiny model;
- the host-derived defaults, from the settings with CUDA present or absent;
- which worker warms up in the background (restarts.py), with forked sibling processes;
- the GPU path of the Predictor (autocast dtype, channels-last, pinned memory, non-blocking copy)
  on a host without a GPU, with the CUDA-only calls recorded instead of run.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from service_fixtures import wait_warm
from vit_service.serving.batcher import AdaptiveBatcher


def _images(n: int, value: int = 0) -> np.ndarray:
    return np.full((n, 3, 4, 4), value, np.uint8)


async def _until(event: threading.Event, seconds: float = 30.0) -> None:
    """Lets the event loop run (the batcher polls on it) until `event` is set by the forward thread."""
    for _ in range(int(seconds / 0.002)):
        if event.is_set():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the forward pass never started")


class _Harness:
    """A forward pass that blocks until released and records who was in it."""

    def __init__(self) -> None:
        self.entered = threading.Event()  # the first pass has started
        self.release = threading.Event()
        self.passes: list[list[int]] = []  # per forward pass: the first pixel of each image (who)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(timeout=60)
        self.passes.append(x[:, 0, 0, 0].tolist())
        return np.repeat(x[:, :1, 0, 0].astype(np.float32), 2, axis=1)  # (B, 2): echoes who


async def _yield(times: int = 5) -> None:
    for _ in range(times):
        await asyncio.sleep(0)  # give the loop a turn


def test_idle_model_forwards_at_once_and_queued_requests_merge_up_to_the_cap() -> None:
    h = _Harness()

    async def main():
        b = AdaptiveBatcher(h.forward, max_batch_size=8, max_latency_s=60)
        first = asyncio.ensure_future(b(_images(2, 1)))
        await _until(h.entered)  # idle: the first request went alone, waiting for no other
        # While it runs (blocked), three requests of 3 images queue: the next pass takes 8 images
        # (the third request split 2 + 1), the one after that the last image.
        queued = [asyncio.ensure_future(b(_images(3, v))) for v in (2, 3, 4)]
        await asyncio.sleep(0.05)
        h.release.set()
        return await asyncio.gather(first, *queued)

    results = asyncio.run(main())
    assert h.passes == [[1, 1], [2, 2, 2, 3, 3, 3, 4, 4], [4]]
    (probs, timing), *rest = results
    assert probs[:, 0].tolist() == [1.0, 1.0] and timing.batch_size == 2
    assert [t.batch_size for _, t in rest] == [8, 8, 1]  # the split request: the last pass it was in
    assert [p[:, 0].tolist() for p, _ in rest] == [[2.0] * 3, [3.0] * 3, [4.0] * 3]  # each gets its own rows, whole
    assert all(t.queue_s >= 0 and t.forward_s > 0 for _, t in results)


# ------------------------------------------------------------ InProcessModel with real settings

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service_fixtures import build_tiny_model

    model, artifact = build_tiny_model()
    return artifact.save(model, tmp_path_factory.mktemp("tiny") / "model")


def _in_process_model(model_dir: Path, env: dict[str, str]):
    from vit_service.serving.model_handle import InProcessModel
    from vit_service.serving.settings import Settings

    settings = Settings.from_env({"VIT_DEVICE": "cpu", "VIT_PRECISION": "fp32", **env})
    model = InProcessModel(settings, str(model_dir), "tiny:test")
    wait_warm(model)
    return model


def _concurrent_passes(model, n: int) -> list[int]:
    """n one-image requests while the first forward pass is held: the sizes of the passes."""
    entered, release, sizes = threading.Event(), threading.Event(), []
    real = model.batcher.forward

    def held(x):
        entered.set()
        release.wait(timeout=60)
        sizes.append(len(x))
        return real(x)

    model.batcher.forward = held

    async def main():
        first = asyncio.ensure_future(model.predict(np.zeros((1, 3, 32, 32), np.uint8), {}))
        await _until(entered)
        rest = [asyncio.ensure_future(model.predict(np.zeros((1, 3, 32, 32), np.uint8), {})) for _ in range(n - 1)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest)

    out = asyncio.run(main())
    assert all(p.shape == (1, 4) for p in out)
    return sizes


def test_vit_batching_0_is_one_forward_pass_per_request(tiny_model_dir: Path) -> None:
    assert _concurrent_passes(_in_process_model(tiny_model_dir, {}), 4) == [1, 3]  # batching: merged
    assert _concurrent_passes(_in_process_model(tiny_model_dir, {"VIT_BATCHING": "0"}), 4) == [1, 1, 1, 1]


def test_overloaded_batch_queue_is_a_503_with_its_message(tiny_model_dir: Path, monkeypatch) -> None:
    """Requests that would wait past VIT_MAX_LATENCY_MS are cancelled by the batcher and answered
    503 "overloaded" (the batcher's clock is moved on while a forward pass is held)."""
    from bentoml._internal.marshal import dispatcher

    from vit_service.serving.errors import OVERLOADED, RequestError

    model = _in_process_model(tiny_model_dir, {"VIT_MAX_LATENCY_MS": "1000"})
    assert model.batcher.max_latency_s == 1.0
    now = [1000.0]
    monkeypatch.setattr(dispatcher.time, "time", lambda: now[0])
    entered, release = threading.Event(), threading.Event()
    real = model.batcher.forward

    def held(x):
        entered.set()
        release.wait(timeout=60)
        return real(x)

    model.batcher.forward = held

    async def main():
        pixels = np.zeros((1, 3, 32, 32), np.uint8)
        first = asyncio.ensure_future(model.predict(pixels, {}))
        await _until(entered)
        late = [asyncio.ensure_future(model.predict(pixels, {})) for _ in range(3)]
        await asyncio.sleep(0.05)
        now[0] += 2.0  # the held pass took 2 s: the queued ones waited past the 1 s limit
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *late, return_exceptions=True)

    first, *late = asyncio.run(main())
    assert first.shape == (1, 4)
    refused = [r for r in late if isinstance(r, RequestError)]
    assert refused and all(r.status == 503 and r.message == OVERLOADED for r in refused), late
    assert all(r.shape == (1, 4) for r in late if not isinstance(r, RequestError))
    assert OVERLOADED == "the model is overloaded; retry shortly"  # the README's 503 "overloaded"


# ------------------------------------------------------------------------- host decisions

@pytest.mark.parametrize("cuda", [True, False])
def test_host_defaults_follow_cuda(monkeypatch, cuda: bool) -> None:
    from vit_service.serving import settings as settings_module
    from vit_service.serving.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(settings_module, "host_cores", lambda: 8)
    s = Settings.from_env({})
    if cuda:  # one worker owns the GPU and decodes with the other cores
        assert (s.workers, s.decode_threads, s.max_batch_size, s.torch_threads) == (1, 7, 64, None)
    else:
        # two workers where memory allows (tests/test_faults.py tests that rule), each with its share of the
        # cores: a quarter of it decoding, the rest the model's
        workers = settings_module.cpu_workers(8, settings_module.available_memory(), 0)
        decode = max(1, (8 // workers) // 4)
        assert (s.workers, s.decode_threads, s.max_batch_size) == (workers, decode, 16)
        assert s.torch_threads == max(1, 8 // workers - decode)
    # VIT_DEVICE=cpu on a CUDA host wins over the host.
    assert Settings.from_env({"VIT_DEVICE": "cpu"}).max_batch_size == 16
    assert Settings.from_env({"VIT_TORCH_THREADS": "3"}).torch_threads == 3


class _Recorder:
    """Records the CUDA-only calls of the Predictor's GPU path and runs the rest on the CPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple] = []
        real_to = torch.Tensor.to
        recorder = self

        def tensor_to(t, *args, **kwargs):
            if any(isinstance(a, torch.device) and a.type == "cuda" for a in args):
                recorder.calls.append(("to", str(args[0]), kwargs.get("non_blocking", False)))
                return t
            return real_to(t, *args, **kwargs)

        def pin_memory(t, *args, **kwargs):
            recorder.calls.append(("pin_memory",))
            return t

        real_contiguous = torch.Tensor.contiguous

        def contiguous(t, *args, **kwargs):
            if kwargs.get("memory_format") is torch.channels_last:
                recorder.calls.append(("contiguous", "channels_last"))
            return real_contiguous(t, *args, **kwargs)

        real_autocast = torch.autocast

        def autocast(device_type, dtype=None, enabled=True, **kwargs):
            recorder.calls.append(("autocast", device_type, dtype, enabled))
            return real_autocast("cpu", dtype=torch.bfloat16, enabled=False)

        monkeypatch.setattr(torch.Tensor, "to", tensor_to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
        monkeypatch.setattr(torch, "autocast", autocast)


@pytest.fixture(autouse=True)
def _keep_torch_backend_flags():
    """The GPU path sets cuDNN benchmark and TF32 globally: put them back after each test."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved


def _predictor(model_dir: Path, device: str, precision: str, monkeypatch, bf16_supported: bool = True):
    """The torch runtime's Predictor for `device` as it is built on a host that has it; the model
    stays on the CPU and where it was sent is recorded."""
    from vit_service.backends.base import ModelSource, Predictor
    from vit_service.backends.torch_runtime import TorchRuntime

    moved = []
    real_module_to = torch.nn.Module.to

    def module_to(m, *args, **kwargs):  # the model stays on the CPU; where it was sent is recorded
        moved.append((args, kwargs))
        if any(isinstance(a, torch.device) and a.type == "cuda" for a in args):
            return m
        if kwargs.get("memory_format") is torch.channels_last:
            return m
        return real_module_to(m, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", module_to)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    source = ModelSource(model_dir, torch.device(device))
    return Predictor(source, TorchRuntime(source, precision=precision)), moved


@pytest.mark.parametrize("bf16_supported, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpu_path_autocasts_channels_last_pinned_non_blocking(tiny_model_dir: Path, monkeypatch, bf16_supported: bool,
                                                              dtype) -> None:
    predictor, moved = _predictor(tiny_model_dir, "cuda", "auto", monkeypatch, bf16_supported)
    assert predictor.precision == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    assert predictor.runtime.channels_last and predictor.describe()["channels_last"] is True
    assert ((torch.device("cuda"),), {}) in moved and ((), {"memory_format": torch.channels_last}) in moved
    assert torch.backends.cudnn.benchmark is True
    rec = _Recorder(monkeypatch)
    probs = predictor.predict_proba(np.zeros((2, 3, 32, 32), np.uint8))
    assert probs.shape == (2, 4) and probs.dtype == np.float32
    assert rec.calls == [("pin_memory",), ("to", "cuda", True), ("contiguous", "channels_last"),
                         ("autocast", "cuda", dtype, True)]


def test_cpu_path_has_none_of_the_gpu_steps(tiny_model_dir: Path, monkeypatch) -> None:
    predictor, moved = _predictor(tiny_model_dir, "cpu", "fp32", monkeypatch)
    assert not predictor.runtime.channels_last and predictor.describe()["channels_last"] is False
    assert all(kwargs.get("memory_format") is None for _, kwargs in moved)
    rec = _Recorder(monkeypatch)
    predictor.predict_proba(np.zeros((2, 3, 32, 32), np.uint8))
    assert rec.calls == [("autocast", "cpu", torch.float32, False)]


# ------------------------------------------------------------------ warm siblings (restarts.py)

def _as_worker(index: int, job: str, conn) -> None:
    """In a forked child (a sibling of the others, as BentoML's workers are): be worker `index`."""
    from bentoml._internal.context import server_context

    from vit_service.serving import restarts

    server_context.worker_index = index
    if job == "serve":
        restarts.mark_warm()
        conn.send("warm")
        conn.recv()  # held until the test lets it die
    elif job == "ask":
        conn.send((restarts.sibling_serving(2), restarts.warm_in_background(2)))
    else:  # "ask often": more asks than the warm sibling's listen backlog holds, none left waiting
        import threading

        answers: list[bool] = []
        asker = threading.Thread(target=lambda: answers.extend(restarts.sibling_serving(2) for _ in range(50)),
                                 daemon=True)
        asker.start()
        asker.join(20)
        conn.send(answers)


def test_a_warm_sibling_is_seen_while_it_lives_and_not_after() -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")

    def ask(index: int) -> tuple[bool, bool]:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_as_worker, args=(index, "ask", child))
        p.start()
        answer = parent.recv()
        p.join(30)
        return answer

    assert ask(1) == (False, True)  # nobody warm: worker 1 warms up in the background
    parent, child = ctx.Pipe()
    warm = ctx.Process(target=_as_worker, args=(2, "serve", child))
    warm.start()
    assert parent.recv() == "warm"
    assert ask(1) == (True, False)  # worker 2 serves: worker 1 (a replacement) warms before accepting
    # A cold worker 1 asks on each /readyz and while it holds requests: asked 50 times, it is told
    # each time, at once (a blocking connect hung for good once the listener's backlog was full).
    asker_end, child = ctx.Pipe()
    asker = ctx.Process(target=_as_worker, args=(1, "ask often", child))
    asker.start()
    assert asker_end.recv() == [True] * 50
    asker.join(30)
    parent.send("die")
    warm.join(30)
    assert ask(1) == (False, True)  # the name went with the process: nothing stale to clean up


def test_the_serving_backend_is_the_races_choice_once_warm(tiny_model_dir: Path) -> None:
    """A model update reuses `InProcessModel.serving`: it must be what the warm-up decision chose,
    not the first candidate the race started from."""
    model = _in_process_model(tiny_model_dir, {"VIT_BACKEND": "auto"})
    described = model._predictor.describe()
    assert model.serving == (described["backend"], described["precision"])
    assert model.serving == (described["decision"]["backend"], described["decision"]["precision"])
    assert model.serving[0] in ("torch", "openvino") and model.serving[1] == "fp32"  # VIT_PRECISION=fp32
    serving = asyncio.run(model.describe()).description["serving"]
    assert model.serving == (serving["backend"], serving["precision"])
    model.close()
