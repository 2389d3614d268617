"""BentoML service: `bentoml serve vit_service.serving.service:ViTClassifier` (or `bentoml serve .`).

`ViTClassifier` is the HTTP front. Its routes are its methods: typed `@bentoml.api` routes
(POST /classify, /classify_batch, /explain, /model_info) and plain GET routes (/model_info, the web
page at / and /ui, the API docs at /docs and /docs.json; asgi_routes.py). Uploads are checked by
UploadMiddleware (uploads.py) before BentoML parses them, decoded and resized to uint8 in a thread
pool, and handed to the model handle (model_handle.py), which runs the model in this process or
in the split-mode model service (VIT_MODE; settings.py lists every setting). Everything about the
model (architecture, class names, preprocessing) comes from the exported artifact (VIT_MODEL_TAG).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import bentoml
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vit_service.explain import METHODS
from vit_service.serving import metrics, pages
from vit_service.serving.asgi_routes import ServiceRoutes
from vit_service.serving.auth import AuthConfig, AuthMiddleware
from vit_service.serving.bentoml_compat import (fold_unknown_paths, label_metrics_with_model,
                                                 probe_survives_dropped_connections)
from vit_service.serving.errors import ErrorShapeMiddleware, RequestError, error_response
from vit_service.serving.explain_answer import CLASS_FIELD, EXPLAIN_FIELDS, FORMAT_FIELD, FORMATS, METHOD_FIELD, explain_answer
from vit_service.serving.model_handle import ModelInfo, model_dependency, open_model
from vit_service.serving.settings import current_settings
from vit_service.serving.uploads import (ENTERED, RETURNED, TIMINGS_SCOPE_KEY, UPLOAD_SCOPE_KEY, UploadMiddleware,
                                         UploadRoute)
from vit_service.serving.validation import (TOP_K_FIELD, choice, class_index, decode_upload, parse_top_k,
                                            top_k_or_default)

logger = logging.getLogger("bentoml.vit_service")
SETTINGS = current_settings()
AUTH = AuthConfig.from_settings(SETTINGS)  # VIT_API_KEY, VIT_API_KEY_FILE, VIT_PROTECT_METRICS (auth.py)
routes = ServiceRoutes()  # the GET routes below, mounted at "/"


@bentoml.asgi_app(routes.app, path="/")
@bentoml.service(
    name="vit_classifier",
    traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
    workers=SETTINGS.workers,
)
class ViTClassifier:
    """The HTTP front: uploads in, top-k JSON out; the model in-process or in ViTModel (VIT_MODE)."""

    # At class scope in both modes, so `bentoml build` packs the model whichever mode the build host picks.
    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)
    model_service = model_dependency(SETTINGS)  # split mode: the model service; else None

    def __init__(self) -> None:
        (logger.info if AUTH.enabled else logger.warning)(AUTH.startup_message())
        label_metrics_with_model(self.bento_model.tag)
        # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
        self.decode_pool = ThreadPoolExecutor(SETTINGS.decode_threads, thread_name_prefix="decode")
        self.model = open_model(SETTINGS, self.bento_model.path, self.bento_model.tag, self.model_service)

    async def __is_ready__(self) -> bool:  # /readyz: 503 until the model is warm
        return await self.model.ready()

    # ------------------------------------------------------------------------ upload routes

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: Optional[int] = None,
                       ctx: bentoml.Context = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Classify one image: the top `top_k` classes (default 5, at most the number of classes),
        highest score first. `curl -F image=@cat.jpg URL/classify`"""
        async def answer(timings: dict[str, float]) -> dict[str, Any]:
            [predictions] = await self.classify_images(self._uploads(ctx, [image]), self._top_k(ctx, top_k), timings)
            return {"predictions": predictions}

        return await self._respond(ctx, "classify", 1, answer)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path], top_k: Optional[int] = None,
                             ctx: bentoml.Context = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Classify several images, results in upload order.
        `curl -F images=@a.jpg -F images=@b.png URL/classify_batch`"""
        async def answer(timings: dict[str, float]) -> dict[str, Any]:
            if len(images) > SETTINGS.max_images:  # in-process calls; HTTP ones were checked already
                raise RequestError(413, f"too many images: {len(images)} in one request, "
                                        f"the limit is {SETTINGS.max_images}", "too_many_images")
            results = await self.classify_images(self._uploads(ctx, images), self._top_k(ctx, top_k), timings)
            return {"results": [{"predictions": p} for p in results]}

        return await self._respond(ctx, "classify_batch", len(images), answer)

    @bentoml.api(route="/explain")
    async def explain(self, image: Path, top_k: Optional[int] = None, method: Optional[str] = None,
                      class_name: Optional[str] = None, format: Optional[str] = None,
                      ctx: bentoml.Context = None) -> dict[str, Any]:  # type: ignore[assignment]
        """Which patches drove the prediction: top-k labels and a rows x cols attention grid in [0, 1]
        over the crop the model saw. `method`: rollout (default; attention rollout) or grad
        (gradient-weighted, class-specific); `class_name`: explain this class instead of the top one;
        `format=png`: the overlay image instead of JSON. `curl -F image=@cat.jpg URL/explain`"""
        async def answer(timings: dict[str, float]) -> Any:
            info = await self.model.describe()
            method_ = choice(method, METHODS, METHOD_FIELD, "rollout")
            fmt = choice(format, FORMATS, FORMAT_FIELD, "json")
            k = top_k_or_default(self._top_k(ctx, top_k), info.class_names)
            wanted = class_index(class_name, CLASS_FIELD, info.class_names)
            [(picture, pixels)] = await self._decode(self._uploads(ctx, [image]), info, timings)
            explained = await self.model.explain(pixels[None], method_, wanted)
            body = await asyncio.get_running_loop().run_in_executor(
                self.decode_pool, explain_answer, picture, explained.probs, explained.grid, explained.class_index,
                info.class_names, info.preprocessing, k, method_, fmt)
            return Response(body, media_type="image/png") if isinstance(body, bytes) else body

        return await self._respond(ctx, "explain", 1, answer)

    # ------------------------------------------------------------------------ model info

    @bentoml.api(route="/model_info")
    async def model_info(self) -> dict[str, Any]:
        """The model: tag, class names, input size, preprocessing, training metadata, serving settings."""
        return await self.describe()

    @routes.get("/model_info")
    async def get_model_info(self, request: Request) -> Response:
        """GET /model_info, as `curl URL/model_info` expects (BentoML's API routes are POST only)."""
        try:
            return JSONResponse(await self.describe())
        except RequestError as e:  # 503 while the model warms up
            return error_response(e.status, e.message)
        except Exception:
            logger.exception("GET /model_info failed")
            return error_response(500, "internal error while describing the model; see the server log")

    async def describe(self) -> dict[str, Any]:
        """The model's description plus this front's request limits; RequestError(503) until the
        model is warm. (Not `self.model_info()`: BentoML routes a call to its own API through HTTP.)"""
        description = (await self.model.describe()).description
        limits = {"max_images_per_request": SETTINGS.max_images, "max_body_bytes": SETTINGS.max_body_bytes,
                  "max_image_pixels": SETTINGS.max_image_pixels}
        # The live objects over the settings that asked for them: the model process's torch
        # threads (from the description) and this front's decode pool.
        live = {"decode_threads": self.decode_pool._max_workers}
        return {**description, "serving": {**SETTINGS.describe(), **description["serving"], **limits, **live}}

    # ------------------------------------------------------------------------ pages

    @routes.get("/")
    @routes.get("/ui")
    async def ui(self, request: Request) -> Response:
        return pages.ui_page()

    @routes.get("/docs")
    async def docs(self, request: Request) -> Response:
        return pages.docs_page()

    @routes.get("/docs.json")
    async def docs_json(self, request: Request) -> Response:
        try:
            return pages.docs_json(ViTClassifier.openapi_spec.asdict(), routes.paths)
        except Exception:
            logger.exception("GET /docs.json failed")
            return error_response(500, "failed to build the OpenAPI spec; see the server log")

    # ------------------------------------------------------------------------ the work

    async def classify_images(self, images: list[tuple[str, bytes]], top_k: int | None = None,
                              timings: dict[str, float] | None = None) -> list[list[dict[str, Any]]]:
        """[(filename, encoded bytes)] -> top-k predictions per image, in order. Raises RequestError.
        Adds its stages (decode, and hop or queue + forward) to `timings`."""
        from vit_service.inference import top_k_predictions

        timings = {} if timings is None else timings
        info = await self.model.describe()
        k = top_k_or_default(top_k, info.class_names)
        if not images:
            raise RequestError(400, "no images given", "missing_field")
        decoded = await self._decode(images, info, timings)
        batch = decoded[0][1][None] if len(decoded) == 1 else np.stack([pixels for _, pixels in decoded])  # (B, 3, S, S)
        probs = await self.model.predict(batch, timings)  # (B, K)
        return [top_k_predictions(p, info.class_names, k) for p in probs]

    async def _decode(self, images: list[tuple[str, bytes]], info: ModelInfo,
                      timings: dict[str, float]) -> list[tuple[Any, np.ndarray]]:
        """Decodes in the thread pool; the first bad image in upload order is the 400."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.decode_pool, decode_upload, name, data, info.preprocessing,
                                     SETTINGS.max_image_pixels, SETTINGS.jpeg_draft) for name, data in images]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        timings["decode"] = time.perf_counter() - start
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _respond(self, ctx: bentoml.Context | None, endpoint: str, n_images: int,
                       answer: Callable[[dict[str, float]], Awaitable[Any]]) -> Any:
        """Every upload route's answer: a RequestError becomes its status and {"error": ...}
        (BentoML would answer a raised 4xx with a list-shaped body) and counts as a rejected
        upload; the request's stages go to its Server-Timing header and the metrics."""
        timings: dict[str, float] = ctx.request.scope.get(TIMINGS_SCOPE_KEY, {}) if ctx is not None else {}
        timings[ENTERED] = time.perf_counter()
        outcome = "error"
        try:
            result = await answer(timings)
            outcome = "ok"
            return result
        except RequestError as e:
            outcome = "overloaded" if e.status == 503 else "rejected" if e.status < 500 else "error"
            if e.status < 500:
                metrics.rejected_uploads_total.labels(reason=e.reason).inc()
            if ctx is None:  # called in-process, not over HTTP
                raise
            ctx.response.status_code = e.status
            return {"error": e.message}
        finally:
            metrics.images_total.labels(endpoint=endpoint, outcome=outcome).inc(n_images)
            timings[RETURNED] = time.perf_counter()

    @staticmethod
    def _top_k(ctx: bentoml.Context | None, top_k: int | None) -> int | None:
        """`top_k` as given, or as a query parameter (?top_k=3; checked by the middleware)."""
        if top_k is None and ctx is not None:
            return parse_top_k(ctx.request.query_params.getlist(TOP_K_FIELD))
        return top_k

    @staticmethod
    def _uploads(ctx: bentoml.Context | None, paths: list[Path]) -> list[tuple[str, bytes]]:
        """(the uploaded file's own name, its bytes); BentoML's temporary files carry a random prefix."""
        upload = ctx.request.scope.get(UPLOAD_SCOPE_KEY) if ctx is not None else None
        if upload is not None and len(upload.files) == len(paths):
            return [(name, p.read_bytes()) for (name, _), p in zip(upload.files, paths)]
        return [(p.name, p.read_bytes()) for p in paths]


# Outermost first: every error answer in one JSON shape, then the API key (a request without one is
# refused before its body is read), then the upload checks.
ViTClassifier.add_asgi_middleware(ErrorShapeMiddleware)
ViTClassifier.add_asgi_middleware(AuthMiddleware, config=AUTH,
                                  on_failure=lambda reason: metrics.auth_failures_total.labels(reason=reason).inc())
UPLOAD_ROUTES = {"/classify": UploadRoute("image"), "/classify_batch": UploadRoute("images", many=True),
                 "/explain": UploadRoute("image", options=EXPLAIN_FIELDS)}
ViTClassifier.add_asgi_middleware(
    UploadMiddleware, max_bytes=SETTINGS.max_body_bytes, routes=UPLOAD_ROUTES, max_files=lambda: SETTINGS.max_images,
    on_reject=lambda reason: metrics.rejected_uploads_total.labels(reason=reason).inc(),
    on_timings=metrics.observe_stages)
fold_unknown_paths(routes.paths | {api.route for api in ViTClassifier.apis.values()})  # the rest: one metrics label
probe_survives_dropped_connections()  # split mode: /readyz while a model worker is replaced
