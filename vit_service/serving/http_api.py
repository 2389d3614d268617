"""The public HTTP API: POST /classify, POST /classify_batch, GET /model_info.

A small Starlette app mounted on the front service. Uploads are parsed here rather than through
typed `@bentoml.api` parameters because BentoML 1.4's multipart handling answers most user
mistakes with a 500: a file under a misnamed field, text where a file belongs (which it even
tries to fetch as a URL), a very long filename. Here every mistake in a request is a 4xx with
`{"error": "<what was wrong>"}`, and the server keeps serving.

Status codes
    400  not an image, empty, truncated or corrupt image, too many pixels, missing or misnamed
         field, text instead of a file, bad `top_k`, malformed multipart body
    408  the upload stopped before the body was complete (client gone, or too slow)
    413  body over the size limit, more images than allowed in one request
    415  not a multipart/form-data request
    429  more requests in flight than `max_concurrency` (BentoML, before we see the request)
    503  the model service is overloaded (batch queue past `max_latency_ms`) or not up
    504  the request took longer than the traffic timeout (BentoML)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

IMAGE_FIELD = "image"  # POST /classify
IMAGES_FIELD = "images"  # POST /classify_batch, repeated
TOP_K_FIELD = "top_k"


class RequestError(Exception):
    """Something wrong with the client's request, answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimitMiddleware:
    """Answers 413 to a request body over `max_bytes`, declared (Content-Length) or streamed.

    BentoML 1.4 has no body limit. A declared length over the limit is refused before reading a
    byte; otherwise the body is counted as the app reads it, chunk by chunk (nothing is buffered
    here), and the read that crosses the limit raises a 413 RequestError: our routes turn it into
    their JSON answer, and for any other route it is answered here if no response has started.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, self._message())(scope, receive, send)

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestError(413, self._message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestError as e:
            if started:
                raise
            await error_response(e.status, e.message)(scope, receive, send)

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes ({self.max_bytes / 2**20:g} MiB)"


@dataclass
class Upload:
    files: list[tuple[str, bytes]]  # (filename, content) in upload order
    top_k: int | None


async def read_upload(request: Request, field: str, many: bool, max_files: int) -> Upload:
    """Parses and checks a multipart upload: image file(s) under `field`, optional `top_k`."""
    example = f"curl -F {field}=@photo.jpg {request.url.path}"
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise RequestError(415, f"expected a multipart/form-data upload with the image in form field "
                                f"'{field}' (e.g. {example}); got Content-Type {content_type or 'none'!r}")
    try:
        form = await request.form()
    except (MultiPartException, HTTPException) as e:
        message = e.message if isinstance(e, MultiPartException) else e.detail
        raise RequestError(400, f"malformed multipart body: {message}") from None
    try:
        names = list(dict.fromkeys(form.keys()))
        if field not in names:
            got = f"; got field(s) {', '.join(map(repr, names))}" if names else "; the form is empty"
            raise RequestError(400, f"missing form field '{field}': send the image file{'s' if many else ''} "
                                    f"as '{field}' (e.g. {example}){got}")
        unknown = [n for n in names if n not in (field, TOP_K_FIELD)]
        if unknown:
            raise RequestError(400, f"unexpected form field(s) {', '.join(map(repr, unknown))}; "
                                    f"expected '{field}' and optionally '{TOP_K_FIELD}'")
        values = form.getlist(field)
        if not many and len(values) > 1:
            raise RequestError(400, f"expected one '{field}' field, got {len(values)}; "
                                    f"use /classify_batch with repeated 'images' fields for several images")
        if len(values) > max_files:
            raise RequestError(413, f"too many images: {len(values)} in one request, the limit is {max_files}")
        files = []
        for i, value in enumerate(values):
            label = f"'{field}'" if not many else f"'{field}' #{i + 1}"
            if not isinstance(value, UploadFile):
                raise RequestError(400, f"form field {label} must be a file upload (e.g. {example}), "
                                        f"not a text value")
            files.append((value.filename or "", await value.read()))
        top_k = parse_top_k([*form.getlist(TOP_K_FIELD), *request.query_params.getlist(TOP_K_FIELD)])
    finally:
        await form.close()
    return Upload(files, top_k)


def parse_top_k(values: list[Any]) -> int | None:
    """The `top_k` form field or query parameter as an int; None when not given."""
    if not values:
        return None
    if len(values) > 1:
        raise RequestError(400, f"'{TOP_K_FIELD}' given {len(values)} times; give it once")
    value = values[0]
    if not isinstance(value, str):
        raise RequestError(400, f"'{TOP_K_FIELD}' must be a plain form value, not a file")
    try:
        return int(value.strip())
    except ValueError:
        raise RequestError(400, f"'{TOP_K_FIELD}' must be an integer, got {value[:40]!r}") from None


Handler = Callable[[Request], Awaitable[Response]]


def json_errors(handler: Handler) -> Handler:
    """RequestError -> its status with {"error": ...}; anything else -> a logged 500, also as JSON."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as e:
            return error_response(e.status, e.message)
        except ClientDisconnect:
            # The upload stopped before its end (client gone, or the traffic timeout fired while
            # it trickled in): the client's doing, not a server error.
            return error_response(408, "the request body ended before it was complete")
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "internal error while classifying; see the server log")

    return wrapper


def _service() -> Any:
    import bentoml

    return bentoml.get_current_service()  # the ViTClassifier instance of this worker


@json_errors
async def classify(request: Request) -> Response:
    svc = _service()
    upload = await read_upload(request, IMAGE_FIELD, many=False, max_files=1)
    [predictions] = await svc.classify_images(upload.files, upload.top_k)
    return JSONResponse({"predictions": predictions})


@json_errors
async def classify_batch(request: Request) -> Response:
    svc = _service()
    upload = await read_upload(request, IMAGES_FIELD, many=True, max_files=svc.settings.max_images)
    results = await svc.classify_images(upload.files, upload.top_k)
    return JSONResponse({"results": [{"predictions": p} for p in results]})


@json_errors
async def model_info(request: Request) -> Response:
    return JSONResponse(await _service().model_info())


async def openapi_spec(request: Request) -> Response:
    """BentoML's spec (/docs.json, read by the Swagger UI at /) plus this app's endpoints."""
    svc = _service()
    spec = svc.bento_service.openapi_spec.asdict()
    spec.setdefault("paths", {}).update(OPENAPI_PATHS)
    return JSONResponse(spec)


def _upload_body(field: str, many: bool) -> dict[str, Any]:
    file_schema = {"type": "string", "format": "binary"}
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field],
        "properties": {
            field: {"type": "array", "items": file_schema} if many else file_schema,
            TOP_K_FIELD: {"type": "integer", "minimum": 1, "default": 5,
                          "description": "how many classes to return (at most the number of classes)"},
        },
    }}}}


_PREDICTIONS = {"type": "array", "items": {"type": "object", "properties": {
    "label": {"type": "string"}, "index": {"type": "integer"}, "score": {"type": "number"}}}}
_ERRORS = {str(code): {"description": text, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}}
    for code, text in [(400, "bad image or form"), (413, "body or batch too large"),
                       (415, "not multipart/form-data"), (429, "too many concurrent requests"),
                       (503, "model overloaded or not ready"), (504, "timed out")]}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


OPENAPI_PATHS: dict[str, Any] = {
    "/classify": {"post": {
        "tags": ["Service APIs"], "summary": "Classify one image (form field 'image')",
        "requestBody": _upload_body(IMAGE_FIELD, many=False),
        "responses": {"200": _json({"type": "object", "properties": {"predictions": _PREDICTIONS}}), **_ERRORS},
    }},
    "/classify_batch": {"post": {
        "tags": ["Service APIs"], "summary": "Classify several images (repeated form field 'images')",
        "requestBody": _upload_body(IMAGES_FIELD, many=True),
        "responses": {"200": _json({"type": "object", "properties": {"results": {"type": "array", "items": {
            "type": "object", "properties": {"predictions": _PREDICTIONS}}}}}), **_ERRORS},
    }},
    "/model_info": {"get": {
        "tags": ["Service APIs"], "summary": "Model tag, class names, input size, preprocessing, training metadata",
        "responses": {"200": _json({"type": "object"})},
    }},
}

async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (405 on GET /classify, ...) as JSON too."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


# Mounted at "/" on the front service. BentoML matches its own routes (/readyz, /metrics, ...)
# first and ours next, before its /docs.json and Swagger UI routes, so /docs.json here wins.
app = Starlette(routes=[
    Route("/classify", classify, methods=["POST"]),
    Route("/classify_batch", classify_batch, methods=["POST"]),
    Route("/model_info", model_info, methods=["GET"]),
    Route("/docs.json", openapi_spec, methods=["GET"]),
], exception_handlers={HTTPException: http_error})
