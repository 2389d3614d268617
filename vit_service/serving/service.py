"""BentoML service: `bentoml serve vit_service.serving.service:ViTClassifier` (or `bentoml serve .`).

`ViTClassifier` is the whole HTTP service. Its routes are its methods: typed `@bentoml.api`
methods (POST /classify, /classify_batch, /explain, /model_info; the upload routes answered by
http.HttpFront, which reads each body once) and GET routes on a FastAPI app BentoML binds to the
service (/model_info, the page at / and /ui, the API docs at /docs and /docs.json). Images are
decoded and resized in a thread pool and handed to the model handle (model_handle.py); every
setting is in settings.py. Everything about the model (architecture, class names, preprocessing)
comes from the exported artifact (VIT_MODEL_TAG).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import bentoml
import numpy as np
from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from vit_service.explain import METHODS
from vit_service.predictions import top_k_predictions
from vit_service.serving import inference_protocol, metrics, pages
from vit_service.serving.auth import AuthConfig, AuthMiddleware
from vit_service.serving.bentoml_compat import fold_unknown_paths, label_metrics_with_model
from vit_service.serving.errors import ErrorShapeMiddleware, RequestError, error_response
from vit_service.serving.explain_answer import CLASS_FIELD, FORMAT_FIELD, FORMATS, METHOD_FIELD, explain_answer
from vit_service.serving.http import HttpFront, UploadedFile, note_model, read_upload, request_timings, served_routes
from vit_service.serving.model_updates import ModelWatcher
from vit_service.serving.model_handle import InProcessModel, ModelInfo
from vit_service.serving.settings import current_settings
from vit_service.serving.validation import choice, class_index, decode_upload, top_k_or_default

logger = logging.getLogger("bentoml.vit_service")
try:
    SETTINGS = current_settings()
except ValueError as e:  # a bad VIT_* value: its one line, and `bentoml serve` exits non-zero
    raise SystemExit(f"vit-service: {e}") from None
AUTH = AuthConfig.from_settings(SETTINGS)  # VIT_API_KEY, VIT_API_KEY_FILE, VIT_PROTECT_METRICS (auth.py)
pages_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # the GET routes below; BentoML's spec documents them
pages_app.include_router(inference_protocol.router)  # /v2: the Open Inference Protocol


@bentoml.asgi_app(pages_app, path="/")
@bentoml.service(
    name="vit_classifier",
    traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
    workers=SETTINGS.workers,
)
class ViTClassifier:
    """Uploads in, top-k JSON out."""

    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)  # at class scope: `bentoml build` packs it

    def __init__(self) -> None:
        (logger.info if AUTH.enabled else logger.warning)(AUTH.startup_message())
        label_metrics_with_model(self.bento_model.tag)
        # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
        self.decode_threads = SETTINGS.decode_threads
        self.decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        self.model = InProcessModel(SETTINGS, self.bento_model.path, self.bento_model.tag)
        # Follows NAME:latest in the store: a new version serves once loaded, warmed and checked.
        following = SETTINGS.model_tag.endswith(":latest") and SETTINGS.model_watch_s > 0
        self.updates = ModelWatcher(self, SETTINGS, SETTINGS.model_watch_s).start() if following else None

    async def __is_ready__(self) -> bool:  # /readyz: 503 until the model is warm
        return await self.model.ready()

    @bentoml.on_deployment
    def check_model() -> None:  # type: ignore[misc]
        """In the `bentoml serve` process, before any worker starts: a model that cannot be served
        with these settings stops the server with its one-line reason and a non-zero exit (a
        worker failing in `__init__` would be restarted forever while clients wait)."""
        from vit_service.backends import check_servable

        try:
            check_servable(bentoml.models.get(SETTINGS.model_tag).path, SETTINGS.backend, SETTINGS.precision)
        except ValueError as e:
            raise SystemExit(f"vit-service: cannot serve {SETTINGS.model_tag}: {e}") from None

    # ------------------------------------------------------------------------ upload routes

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: Optional[int] = None) -> dict[str, Any]:
        """Classify one image: the top `top_k` classes (default 5, at most the number of classes),
        highest score first. `curl -F image=@cat.jpg URL/classify`"""
        [predictions] = await self.classify_images([read_upload(image)], top_k)
        return {"predictions": predictions}

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path], top_k: Optional[int] = None) -> dict[str, Any]:
        """Classify several images, results in upload order.
        `curl -F images=@a.jpg -F images=@b.png URL/classify_batch`"""
        if len(images) > SETTINGS.max_images:  # Python calls; HTTP ones were checked already
            raise RequestError(413, f"too many images: {len(images)} in one request, "
                                    f"the limit is {SETTINGS.max_images}", "too_many_images")
        results = await self.classify_images([read_upload(i) for i in images], top_k)
        return {"results": [{"predictions": p} for p in results]}

    @bentoml.api(route="/explain")
    async def explain(self, image: Path, top_k: Optional[int] = None, method: Optional[str] = None,
                      class_name: Optional[str] = None, format: Optional[str] = None) -> dict[str, Any]:
        """Which patches drove the prediction: top-k labels and a rows x cols attention grid in [0, 1]
        over the crop the model saw. `method`: rollout (default; attention rollout) or grad
        (gradient-weighted, class-specific); `class_name`: explain this class instead of the top one;
        `format=png`: the overlay image instead of JSON. `curl -F image=@cat.jpg URL/explain`"""
        model = self.model  # one version for the whole request, whatever moves meanwhile
        info = await model.describe()
        note_model(model.tag)
        method_ = choice(method, METHODS, METHOD_FIELD, "rollout")
        fmt = choice(format, FORMATS, FORMAT_FIELD, "json")
        k = top_k_or_default(top_k, info.class_names)
        wanted = class_index(class_name, CLASS_FIELD, info.class_names)
        [(picture, pixels)] = await self.decode([read_upload(image)], info)
        explained = await model.explain(pixels[None], method_, wanted)
        body = await asyncio.get_running_loop().run_in_executor(
            self.decode_pool, explain_answer, picture, explained.probs, explained.grid, explained.class_index,
            info.class_names, info.preprocessing, k, method_, fmt)
        return Response(body, media_type="image/png") if isinstance(body, bytes) else body  # type: ignore[return-value]

    # ------------------------------------------------------------------------ model info

    @bentoml.api(route="/model_info")
    async def model_info(self) -> dict[str, Any]:
        """The model: tag, class names, input size, preprocessing, training metadata, serving settings."""
        return await self.describe()

    @pages_app.get("/model_info", response_model=None)
    async def get_model_info(self) -> Response:
        """The model: tag, class names, input size, preprocessing, training metadata, serving settings."""
        try:
            return JSONResponse(await self.describe())
        except RequestError as e:  # 503 while the model warms up
            return error_response(e.status, e.message)

    async def describe(self) -> dict[str, Any]:
        """The model's description plus this service's request limits; RequestError(503) until the
        model is warm. (Not `self.model_info()`: BentoML routes a call to its own API through HTTP.)"""
        model = self.model
        description = (await model.describe()).description
        limits = {"max_images_per_request": SETTINGS.max_images, "max_body_bytes": SETTINGS.max_body_bytes,
                  "max_image_pixels": SETTINGS.max_image_pixels}
        return {**description, "serving": {**SETTINGS.describe(), **description["serving"], **limits,
                                           "decode_threads": self.decode_threads},
                "drift": model.drift_status(),
                "updates": self.updates.status() if self.updates else {"following": None}}

    # ------------------------------------------------------------------------ pages

    @pages_app.get("/", include_in_schema=False)
    @pages_app.get("/ui", include_in_schema=False)
    async def ui(self) -> Response:
        return pages.ui_page()

    @pages_app.get("/docs", include_in_schema=False)
    async def docs(self) -> Response:
        return pages.docs_page()

    @pages_app.get("/docs.json", include_in_schema=False)
    async def docs_json(self) -> Response:
        return pages.docs_json(ViTClassifier)

    # ------------------------------------------------------------------------ the work

    async def classify_images(self, images: list[UploadedFile], top_k: int | None = None) -> list[list[dict[str, Any]]]:
        """Uploaded images -> top-k predictions per image, in order. Raises RequestError."""
        model = self.model  # one version for the whole request, whatever moves meanwhile
        info = await model.describe()
        note_model(model.tag)
        k = top_k_or_default(top_k, info.class_names)
        if not images:
            raise RequestError(400, "no images given", "missing_field")
        decoded = await self.decode(images, info)
        batch = decoded[0][1][None] if len(decoded) == 1 else np.stack([pixels for _, pixels in decoded])  # (B, 3, S, S)
        probs = await model.predict(batch, request_timings())  # (B, K)
        return [top_k_predictions(p, info.class_names, k) for p in probs]

    async def decode(self, images: list[UploadedFile], info: ModelInfo) -> list[tuple[Any, np.ndarray]]:
        """Decodes in the thread pool; the first bad image in upload order is the 400."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.decode_pool, decode_upload, image.name, image.data, info.preprocessing,
                                     SETTINGS.max_image_pixels, SETTINGS.jpeg_draft) for image in images]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        request_timings()["decode"] = time.perf_counter() - start
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]


# Outermost first: every error answer in one JSON shape, then the API key (a request without one is
# refused before its body is read), then the body limit and the upload routes.
ViTClassifier.add_asgi_middleware(ErrorShapeMiddleware)
ViTClassifier.add_asgi_middleware(AuthMiddleware, config=AUTH,
                                  on_failure=lambda reason: metrics.auth_failures_total.labels(reason=reason).inc())
ViTClassifier.add_asgi_middleware(HttpFront, service=ViTClassifier, max_bytes=SETTINGS.max_body_bytes,
                                  max_files=SETTINGS.max_images)
fold_unknown_paths(set(served_routes(ViTClassifier, pages_app)))  # the rest: one metrics label
