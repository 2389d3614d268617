"""BentoML service: `bentoml serve vit_service.serving.service:ViTClassifier` (or `bentoml serve .`).

`ViTClassifier` is the HTTP front: typed `@bentoml.api` routes /classify, /classify_batch and
/model_info; uploads are checked by UploadMiddleware (uploads.py) first, decoded and resized to
uint8 in a thread pool, classified, and answered as top-k JSON. Where the model runs depends on
VIT_MODE:
    inprocess  (auto on CPU-only hosts) in the front process, behind an in-process adaptive
               batcher (batcher.py): no second process, no HTTP hop, no pickling, no added wait.
    split      (auto with CUDA) in `ViTModel`, its own BentoML service (`bentoml.depends`) whose
               batchable API merges concurrent calls into one forward pass on the GPU, while
               several front workers decode on the CPU cores; only uint8 pixels cross between them.
Everything about the model (architecture, class names, preprocessing) comes from the exported
artifact named by VIT_MODEL_TAG.

Settings: environment variables read at start-up, declared and documented in settings.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional

import aiohttp
import bentoml
import httpx
import numpy as np
from bentoml.validators import DType

from vit_service.serving.explain_answer import EXPLAIN_FIELDS
from vit_service.preprocessing import InvalidImageError, Preprocessing, decode_image
from vit_service.serving import metrics
from vit_service.serving.batcher import AdaptiveBatcher, Overloaded
from vit_service.serving.uploads import (ENTERED, IMAGE_FIELD, IMAGES_FIELD, RETURNED, TIMINGS_SCOPE_KEY, TOP_K_FIELD,
                                          UPLOAD_SCOPE_KEY, RequestError, UploadMiddleware, UploadRoute, app,
                                          parse_top_k)
from vit_service.serving.settings import Settings

logger = logging.getLogger("bentoml.vit_service")
DEFAULT_TOP_K = 5
SETTINGS = Settings.from_env()
# Test hook: warm-up waits until this file exists, so a test can watch /readyz answer 503 first.
WARMUP_GATE_ENV = "VIT_TEST_WARMUP_GATE"


def label_metrics_with_model(tag: Any) -> None:
    """BentoML labels its metrics service_version="not available" when serving from source
    rather than from a built Bento: label them with the model tag instead."""
    from bentoml._internal.context import server_context

    if server_context.bento_version == "not available":
        server_context.bento_version = str(tag)


def load_predictor(model_path: str) -> Any:
    """The exported model on its device (not yet warmed up; `warm_up` does that), with the configured
    torch threads and the backend chosen by VIT_BACKEND."""
    from vit_service.backend import load_backend

    if SETTINGS.torch_threads:
        import torch

        torch.set_num_threads(SETTINGS.torch_threads)
    return load_backend(model_path, backend=SETTINGS.backend,
                        device=SETTINGS.device, precision=SETTINGS.precision,
                        compile_mode=SETTINGS.compile_mode, threads=SETTINGS.torch_threads)


def warm_up(predictor: Any, tag: Any) -> None:
    gate = os.environ.get(WARMUP_GATE_ENV)
    if gate:
        while not Path(gate).exists():
            time.sleep(0.05)
    seconds = predictor.warmup(SETTINGS.max_batch_size)
    logger.info("model %s ready on %s in %.1f s", tag, predictor.describe(), seconds)


def make_explainer(predictor: Any, model_path: str) -> Any:
    """The /explain engine. Attention maps need the torch model (its attention and gradients), so
    when onnxruntime serves /classify (VIT_BACKEND) the torch model is loaded beside it."""
    from vit_service.artifact import load_model
    from vit_service.explain import Explainer

    model = getattr(predictor, "model", None)
    if model is None:
        model, _ = load_model(model_path)
        return Explainer(model, predictor.artifact, "cpu")  # onnxruntime runs on CPU-only hosts
    return Explainer(model, predictor.artifact, predictor.device)


def describe_model(predictor: Any, tag: Any) -> dict[str, Any]:
    """What the front needs to prepare inputs and label outputs, and what /model_info shows."""
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
        "serving": {**predictor.describe(), "batching": SETTINGS.batching,
                    "max_batch_size": SETTINGS.max_batch_size, "max_latency_ms": SETTINGS.max_latency_ms},
    }


@bentoml.service(name="vit_model", traffic={"timeout": SETTINGS.timeout}, workers=1)
class ViTModel:
    """Split mode: the model on its device, behind one adaptive-batching API."""

    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)  # at class scope: `bentoml build` packs it

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.ready = False
        label_metrics_with_model(self.bento_model.tag)
        self.predictor = load_predictor(self.bento_model.path)
        warm_up(self.predictor, self.bento_model.tag)
        # /explain runs here, one at a time in its own thread: never in the batch queue, and
        # never more than one core's worth of work taken from /classify's forward passes.
        self.explainer = make_explainer(self.predictor, self.bento_model.path)
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="explain")
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(batchable=SETTINGS.batching, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def predict(self, images: Annotated[np.ndarray, DType("uint8")]) -> np.ndarray:
        """(B, 3, S, S) uint8 images, resized and cropped -> (B, num_classes) float32 probabilities."""
        start = time.perf_counter()
        try:
            probs = self.predictor.predict_proba(images)
        except ValueError as e:
            raise bentoml.exceptions.InvalidArgument(str(e)) from None
        metrics.stage_seconds.labels(stage="forward").observe(time.perf_counter() - start)
        metrics.batch_size.observe(len(images))
        return probs

    @bentoml.api
    async def explain(self, pixels: Annotated[np.ndarray, DType("uint8")], method: str = "rollout",
                      class_index: Optional[int] = None) -> dict[str, Any]:
        """(1, 3, S, S) uint8 -> probabilities, the explained class and the (Gh, Gw) map in [0, 1]."""
        loop = asyncio.get_running_loop()
        try:
            probs, target, maps = await loop.run_in_executor(
                self.explain_pool, self.explainer.explain_uint8, pixels, method, class_index)
        except ValueError as e:
            raise bentoml.exceptions.InvalidArgument(str(e)) from None
        return {"probs": probs[0].tolist(), "class_index": int(target[0]), "grid": maps[0].tolist()}

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return describe_model(self.predictor, self.bento_model.tag)


@bentoml.asgi_app(app, path="/")  # GET /model_info (BentoML's API routes are POST only)
@bentoml.service(
    name="vit_classifier",
    traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
    workers=SETTINGS.workers,
)
class ViTClassifier:
    """The HTTP front: uploads in, top-k JSON out; the model in-process or in ViTModel (VIT_MODE)."""

    # At class scope in both modes, so `bentoml build` packs the model whichever mode the
    # build host would pick.
    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)
    if SETTINGS.mode == "split":
        model = bentoml.depends(ViTModel)

    def __init__(self) -> None:
        self.settings = SETTINGS
        label_metrics_with_model(self.bento_model.tag)
        # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
        self.decode_pool = ThreadPoolExecutor(SETTINGS.decode_threads, thread_name_prefix="decode")
        self._info: dict[str, Any] | None = None
        self._preprocessing: Preprocessing | None = None
        self.batcher: AdaptiveBatcher | None = None
        self._warm = threading.Event()
        if SETTINGS.mode == "split":
            _keep_one_session(self.model)
            return
        predictor = load_predictor(self.bento_model.path)
        self._preprocessing = predictor.preprocessing
        # /explain in-process: its own single thread, beside (never inside) the batcher.
        self.explainer = make_explainer(predictor, self.bento_model.path)
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="explain")
        self.batcher = AdaptiveBatcher(predictor.predict_proba,
                                       max_batch_size=SETTINGS.max_batch_size if SETTINGS.batching else 1,
                                       max_latency_s=SETTINGS.max_latency_ms / 1000,
                                       on_batch=metrics.batch_size.observe)

        def warm() -> None:  # in the background, so /readyz answers 503 meanwhile
            try:
                warm_up(predictor, self.bento_model.tag)
            except Exception:  # stays unready (503), with the reason in the log
                logger.exception("warm-up of %s failed; the service stays unready", self.bento_model.tag)
                return
            self._info = self._with_limits(describe_model(predictor, self.bento_model.tag))
            self._warm.set()

        threading.Thread(target=warm, name="warmup", daemon=True).start()

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: Optional[int] = None,
                       ctx: bentoml.Context = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Classify one image: the top `top_k` classes (default 5, at most the number of classes),
        highest score first. `curl -F image=@cat.jpg URL/classify`"""
        return await self._answer(ctx, "classify", [image], top_k, lambda results: {"predictions": results[0]})

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path], top_k: Optional[int] = None,
                             ctx: bentoml.Context = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Classify several images, results in upload order.
        `curl -F images=@a.jpg -F images=@b.png URL/classify_batch`"""
        if len(images) > SETTINGS.max_images:  # in-process calls; HTTP ones were checked already
            return _error(ctx, RequestError(413, f"too many images: {len(images)} in one request, "
                                                 f"the limit is {SETTINGS.max_images}"))
        return await self._answer(ctx, "classify_batch", images, top_k,
                                  lambda results: {"results": [{"predictions": p} for p in results]})

    @bentoml.api(route="/explain")
    async def explain(self, image: Path, top_k: Optional[int] = None, method: Optional[str] = None,
                      class_name: Optional[str] = None, format: Optional[str] = None,
                      ctx: bentoml.Context = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Which patches drove the prediction: top-k labels and a rows x cols attention grid in [0, 1]
        over the crop the model saw. `method`: rollout (default; attention rollout) or grad
        (gradient-weighted, class-specific); `class_name`: explain this class instead of the top one;
        `format=png`: the overlay image instead of JSON. `curl -F image=@cat.jpg URL/explain`"""
        from starlette.responses import Response

        from vit_service.serving.explain_answer import explain_upload

        if top_k is None and ctx is not None:
            top_k = parse_top_k(ctx.request.query_params.getlist(TOP_K_FIELD))
        try:
            [name] = _upload_names(ctx, [image])
            result = await explain_upload(self, name, image.read_bytes(), top_k, method, class_name, format)
        except RequestError as e:
            return _error(ctx, e)
        if isinstance(result, bytes):
            return Response(result, media_type="image/png")  # type: ignore[return-value]
        return result

    @bentoml.api(route="/model_info")
    async def model_info(self) -> dict[str, Any]:
        """The model: tag, class names, input size, preprocessing, training metadata, serving settings."""
        return await self.describe()

    async def describe(self) -> dict[str, Any]:
        """The model's description plus this front's request limits; raises RequestError(503)
        until the model is warm. (Not `self.model_info()`: BentoML routes a service's call to
        its own API through HTTP.)"""
        if self._info is None:
            if SETTINGS.mode != "split":
                raise RequestError(503, "the model is still warming up; retry shortly", "not_ready")
            info = await self.model.to_async.info()
            self._preprocessing = Preprocessing.from_dict(info["preprocessing"])
            self._info = self._with_limits(info)
        return self._info

    @staticmethod
    def _with_limits(info: dict[str, Any]) -> dict[str, Any]:
        info["serving"].update(max_images_per_request=SETTINGS.max_images, max_body_bytes=SETTINGS.max_body_bytes,
                               max_image_pixels=SETTINGS.max_image_pixels, **SETTINGS.describe())
        return info

    async def __is_ready__(self) -> bool:
        # /readyz: ready once the model is warm. In split mode, once the model service answers;
        # until then a call to it hangs in its socket's backlog, hence the short bound.
        if SETTINGS.mode != "split":
            return self._warm.is_set()
        try:
            await asyncio.wait_for(self.describe(), timeout=2)
        except Exception:
            return False
        return True

    async def _answer(self, ctx: bentoml.Context | None, endpoint: str, paths: list[Path], top_k: int | None,
                      shape: Callable[[list[list[dict[str, Any]]]], dict[str, Any]]) -> dict[str, Any]:
        """Runs classify_images on the uploaded files; a RequestError becomes its status and
        {"error": ...} (BentoML would answer a raised 4xx with a list-shaped body)."""
        timings: dict[str, float] = ctx.request.scope.get(TIMINGS_SCOPE_KEY, {}) if ctx is not None else {}
        timings[ENTERED] = time.perf_counter()
        if top_k is None and ctx is not None:  # ?top_k=3 as a query parameter (checked by the middleware)
            top_k = parse_top_k(ctx.request.query_params.getlist(TOP_K_FIELD))
        outcome = "error"
        try:
            images = [(name, p.read_bytes()) for name, p in zip(_upload_names(ctx, paths), paths)]
            answer = shape(await self.classify_images(images, top_k, timings))
            outcome = "ok"
            return answer
        except RequestError as e:
            outcome = "overloaded" if e.status == 503 else "rejected" if e.status < 500 else "error"
            if e.status < 500:
                metrics.rejected_uploads_total.labels(reason=e.reason).inc()
            return _error(ctx, e)
        finally:
            metrics.images_total.labels(endpoint=endpoint, outcome=outcome).inc(len(paths))
            timings[RETURNED] = time.perf_counter()

    async def classify_images(self, images: list[tuple[str, bytes]], top_k: int | None = None,
                              timings: dict[str, float] | None = None) -> list[list[dict[str, Any]]]:
        """[(filename, encoded bytes)] -> top-k predictions per image, in order. Raises RequestError.
        Adds its stages (decode, and hop or queue + forward) to `timings`."""
        from vit_service.inference import top_k_predictions

        timings = {} if timings is None else timings
        info = await self.describe()
        class_names = info["class_names"]
        k = min(DEFAULT_TOP_K, len(class_names)) if top_k is None else top_k
        if not 1 <= k <= len(class_names):
            raise RequestError(400, f"top_k must be between 1 and {len(class_names)} (the number of classes), got {k}",
                               "bad_top_k")
        if not images:
            raise RequestError(400, "no images given", "missing_field")
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        if len(images) == 1:
            jobs = [loop.run_in_executor(self.decode_pool, self._prepare, *images[0])]
        else:
            jobs = [loop.run_in_executor(self.decode_pool, self._prepare, name, data) for name, data in images]
        pixels = await asyncio.gather(*jobs, return_exceptions=True)
        timings["decode"] = time.perf_counter() - start
        for result in pixels:  # report the first bad image in upload order
            if isinstance(result, InvalidImageError):
                raise RequestError(400, str(result), "bad_image")
            if isinstance(result, BaseException):
                raise result
        batch = pixels[0][None] if len(pixels) == 1 else np.stack(pixels)  # (B, 3, S, S) uint8
        probs = await self._predict(batch, timings)  # (B, K)
        return [top_k_predictions(p, class_names, k) for p in probs]

    def _prepare(self, name: str, data: bytes) -> np.ndarray:
        """Encoded image -> (3, S, S) uint8, in a decoding thread."""
        pre = self._preprocessing
        assert pre is not None
        try:
            image = decode_image(data, SETTINGS.max_image_pixels,
                                 draft_size=pre.resize_size if SETTINGS.jpeg_draft else None)
        except InvalidImageError as e:
            raise InvalidImageError(f"{name or 'upload'}: {e}") from None
        return pre.to_uint8(image).numpy()

    async def _predict(self, batch: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        if self.batcher is not None:
            try:
                probs, timing = await self.batcher(batch)
            except Overloaded:
                raise RequestError(503, "the model is overloaded; retry shortly", "overloaded") from None
            timings["queue"], timings["forward"] = timing.queue_s, timing.forward_s
            return probs
        start = time.perf_counter()
        try:
            return await self._call_model_service(batch)
        finally:
            timings["hop"] = time.perf_counter() - start

    async def _call_model_service(self, batch: np.ndarray) -> np.ndarray:
        from bentoml.exceptions import BentoMLException

        for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
            try:
                return await self.model.to_async.predict(batch)
            except BentoMLException as e:
                status = int(e.error_code)
                if status in (429, 503):
                    raise RequestError(503, "the model is overloaded; retry shortly", "overloaded") from None
                if status == 504:
                    raise RequestError(504, "the model did not answer in time") from None
                raise
            except _TIMEOUTS:
                raise RequestError(504, "the model did not answer in time") from None
            except _DISCONNECTS as e:
                # A dropped connection to the model service: its worker restarted, or BentoML's
                # client closed its session under this call (see _keep_one_session). predict is
                # idempotent, so call again.
                logger.info("model call failed (%r), attempt %d of %d", e, attempt, MODEL_CALL_ATTEMPTS)
        raise RequestError(503, "the model service is unavailable; retry shortly")


def _keep_one_session(model: Any) -> None:
    """Stops BentoML's dependency client from replacing its HTTP session every 100 calls.

    BentoML 1.4.30+ (proxy2) swaps the aiohttp session every 100 calls and 5 minutes and closes
    the old one under the calls still in flight; `_predict` retries those, but at 32 concurrent
    requests that redoes up to a third of the work. To a local model service one session is fine.
    A no-op in-process, or if BentoML's client changes.
    """
    manager = getattr(getattr(model, "to_async", None), "_session_manager", None)
    if manager is not None and hasattr(manager, "max_requests") and hasattr(manager, "max_age"):
        manager.max_requests = manager.max_age = float("inf")


# Errors of the inter-service client: aiohttp in BentoML >= 1.4.30 (proxy2), httpx before.
# Timeouts first: aiohttp's ServerTimeoutError is also a connection error.
_TIMEOUTS = (TimeoutError, httpx.TimeoutException)
_DISCONNECTS = (aiohttp.ClientConnectionError, httpx.TransportError)
MODEL_CALL_ATTEMPTS = 3


def _error(ctx: bentoml.Context | None, e: RequestError) -> dict[str, Any]:
    if ctx is None:  # called in-process, not over HTTP
        raise e
    ctx.response.status_code = e.status
    return {"error": e.message}


def _upload_names(ctx: bentoml.Context | None, paths: list[Path]) -> list[str]:
    """The uploaded files' own names (BentoML's temporary files carry a random prefix)."""
    upload = ctx.request.scope.get(UPLOAD_SCOPE_KEY) if ctx is not None else None
    if upload is not None and len(upload.files) == len(paths):
        return [name for name, _ in upload.files]
    return [p.name for p in paths]


UPLOAD_ROUTES = {"/classify": UploadRoute(IMAGE_FIELD, many=False), "/classify_batch": UploadRoute(IMAGES_FIELD, many=True),
                 "/explain": UploadRoute(IMAGE_FIELD, many=False, options=EXPLAIN_FIELDS)}
ViTClassifier.add_asgi_middleware(
    UploadMiddleware, max_bytes=SETTINGS.max_body_bytes, routes=UPLOAD_ROUTES, max_files=lambda: SETTINGS.max_images,
    on_reject=lambda reason: metrics.rejected_uploads_total.labels(reason=reason).inc(),
    on_timings=metrics.observe_stages)
# BentoML's own routes, ours, and the Swagger UI's static files; anything else folds into one label.
metrics.fold_unknown_paths(
    known_paths={"/", "/ui", "/docs", "/metrics", "/healthz", "/livez", "/readyz", "/docs.json", "/schema.json", "/model_info",
                 *(api.route for api in ViTClassifier.apis.values()), *(api.route for api in ViTModel.apis.values())},
    known_prefixes=("/static_content/", "/assets/"),
)
