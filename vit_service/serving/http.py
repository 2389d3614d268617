"""HTTP, owned here: every body limited, every upload read, parsed and checked once, then answered.

The upload routes are the service's typed `@bentoml.api` methods (service.py), so BentoML's
clients and OpenAPI spec know them, and a file parameter (`image: Path`, `images: list[Path]`)
makes a route an upload route here. BentoML 1.4's own multipart handling answers most user
mistakes with a 500 or a list-shaped body (a non-image upload, a misnamed field, text where a
file belongs, which it even fetches as a URL) and has no body limit (bentoml 1.4.38-1.4.40), so
`HttpFront` answers these routes itself: it reads the body (bounded), parses the form, checks it
against the method's signature, calls the method with the files already read (`UploadedFile`)
and answers its result as JSON, its `RequestError` as `{"error": ...}`. Every other route keeps
BentoML's handling, under the same body limit.

The status codes, each with when it is answered: docs/serving.md, "Errors and retries".
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import bentoml
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vit_service.serving import metrics
from vit_service.serving.bentoml_compat import worker_index
from vit_service.serving.errors import RequestError, error_response
from vit_service.serving.validation import TOP_K_FIELD, parse_top_k

MAX_FILENAME_BYTES = 200  # the OS caps names at 255; a longer one is someone's mistake
_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("vit_timings", default=None)
_answered_by: contextvars.ContextVar[str | None] = contextvars.ContextVar("vit_answered_by", default=None)
MODEL_HEADER = "x-model-version"  # which model version answered (the store's NAME:VERSION)
WORKER_HEADER = "x-worker"  # which worker process answered (1, 2, ...): "the same answer from every worker" is checkable


@dataclass(frozen=True)
class UploadedFile:
    """An uploaded file, already read: what an upload route's file parameter holds over HTTP."""
    name: str
    data: bytes


def read_upload(value: Path | UploadedFile) -> UploadedFile:
    """The route's file parameter as an UploadedFile: over HTTP it is one, in a Python call a Path."""
    return value if isinstance(value, UploadedFile) else UploadedFile(value.name, Path(value).read_bytes())


def note_model(tag: str) -> None:
    """Records which model version answers this request (its MODEL_HEADER)."""
    _answered_by.set(tag)


def request_timings() -> dict[str, float]:
    """This request's stage timings (Server-Timing, metrics), for the route to add its own stages."""
    timings = _timings.get()
    return timings if timings is not None else {}


@dataclass(frozen=True)
class UploadRoute:
    api: str  # the service method's name
    field: str  # the form field holding the image file(s)
    many: bool  # repeated field allowed
    options: tuple[str, ...]  # the method's other parameters: plain-text form fields


def upload_routes(service: Any) -> dict[str, UploadRoute]:
    """{route: UploadRoute} for every API of `service` (a bentoml Service) with one file parameter."""
    routes = {}
    for name, api in service.apis.items():
        fields = {f: info.annotation for f, info in api.input_spec.model_fields.items()}
        files = [f for f, kind in fields.items() if _bare(kind) is Path or
                 (get_origin(kind) is list and _bare(get_args(kind)[0]) is Path)]
        if len(files) == 1:
            routes[api.route] = UploadRoute(name, files[0], get_origin(fields[files[0]]) is list,
                                            tuple(f for f in fields if f != files[0]))
    return routes


def _bare(annotation: Any) -> Any:
    """`Annotated[X, ...]` -> X (BentoML annotates file parameters with their schema)."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def served_routes(service: Any, app: Any) -> dict[str, set[str]]:
    """{path: methods} of everything `service` serves itself: its typed APIs (POST) and the routes
    of its mounted FastAPI `app` (BentoML re-includes those bound to the service, hence the walk)."""
    served: dict[str, set[str]] = {api.route: {"POST"} for api in service.apis.values()}
    pending = list(app.routes)
    while pending:
        route = pending.pop()
        if hasattr(route, "original_router"):
            pending.extend(route.original_router.routes)
        elif isinstance(getattr(route, "path", None), str):
            served.setdefault(route.path, set()).update(getattr(route, "methods", None) or {"GET"})
    return served


class HttpFront:
    """Body limit for every route; the upload routes answered here (see the module docstring).

    A declared length over `max_bytes` is refused before reading a byte; otherwise the body is
    counted as it arrives and the read that crosses the limit is a 413.
    """

    def __init__(self, app: ASGIApp, service: Any, max_bytes: int, max_files: int) -> None:
        self.app = app
        self.service = service
        self.routes = upload_routes(service)
        self.max_bytes = max_bytes
        self.max_files = max_files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.routes.get(scope["path"])
        try:
            declared = Headers(scope=scope).get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise RequestError(413, self._too_large(), "body_too_large")
            if route is None:
                return await self._counted(scope, receive, send)
            if scope["method"] != "POST":
                return await error_response(405, "Method Not Allowed", {"allow": "POST"})(scope, receive, send)
        except RequestError as e:
            metrics.rejected_uploads_total.labels(reason=e.reason).inc()
            return await error_response(e.status, e.message)(scope, receive, send)
        response = await self._answer(route, scope, receive)
        await response(scope, receive, send)

    async def _answer(self, route: UploadRoute, scope: Scope, receive: Receive) -> Response:
        timings: dict[str, float] = {}
        token, answered = _timings.set(timings), _answered_by.set(None)
        outcome, n_images = "error", 0  # images counted once the form is good
        try:
            start = time.perf_counter()
            body = await self._read_body(receive)
            read_done = time.perf_counter()
            kwargs = await parse_upload(scope, body, route, self.max_files)
            timings["read"], timings["parse"] = read_done - start, time.perf_counter() - read_done
            n_images = len(kwargs[route.field]) if route.many else 1
            # The method itself (`.func`): the API wrapper would validate the files as paths again.
            result = await self.service.apis[route.api].func(bentoml.get_current_service(), **kwargs)
            outcome = "ok"
            done = time.perf_counter()
            response = result if isinstance(result, Response) else Response(
                json.dumps(result).encode(), media_type="application/json")
            timings["serialize"] = time.perf_counter() - done
        except RequestError as e:
            outcome = "overloaded" if e.status == 503 else "rejected" if e.status < 500 else "error"
            if e.status < 500:
                metrics.rejected_uploads_total.labels(reason=e.reason).inc()
            response = error_response(e.status, e.message)
        finally:
            tag = _answered_by.get()
            _timings.reset(token)
            _answered_by.reset(answered)
            if n_images:
                metrics.images_total.labels(endpoint=route.api, outcome=outcome).inc(n_images)
        if tag:
            response.headers[MODEL_HEADER] = tag
            response.headers[WORKER_HEADER] = str(worker_index())
        if timings:
            response.headers["server-timing"] = metrics.server_timing(timings)
            metrics.observe_stages(timings)
        return response

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The upload stopped before its end (client gone, or the traffic timeout fired
                # while it trickled in): the client's doing, not a server error.
                raise RequestError(408, "the request body ended before it was complete", "incomplete_body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise RequestError(413, self._too_large(), "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any other route: count the body as the app reads it, nothing buffered here."""
        received, started = 0, False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestError(413, self._too_large(), "body_too_large")
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
            metrics.rejected_uploads_total.labels(reason=e.reason).inc()
            await error_response(e.status, e.message)(scope, receive, send)

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes ({self.max_bytes / 2**20:g} MiB)"


async def parse_upload(scope: Scope, body: bytes, route: UploadRoute, max_files: int) -> dict[str, Any]:
    """A multipart upload checked against the route -> the method's keyword arguments."""
    async def whole_body() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request(scope, whole_body)
    example = f"curl -F {route.field}=@photo.jpg {request.url.path}"
    content_type = request.headers.get("content-type", "")
    # A url-encoded form is parsed too (BentoML's client sends one when no file is given), so
    # its text 'image' gets the "must be a file" answer below.
    if content_type.split(";")[0].strip().lower() not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise RequestError(415, f"expected a multipart/form-data upload with the image in form field "
                                f"'{route.field}' (e.g. {example}); got Content-Type {content_type or 'none'!r}",
                           "not_multipart")
    try:
        form = await request.form()
    except (MultiPartException, HTTPException) as e:
        message = e.message if isinstance(e, MultiPartException) else e.detail
        raise RequestError(400, f"malformed multipart body: {message}", "malformed_multipart") from None
    try:
        return await _check_form(form, request, route, max_files, example)
    finally:
        await form.close()


async def _check_form(form: FormData, request: Request, route: UploadRoute, max_files: int,
                      example: str) -> dict[str, Any]:
    field, many = route.field, route.many
    names = list(dict.fromkeys(form.keys()))
    if field not in names:
        got = f"; got field(s) {', '.join(map(repr, names))}" if names else "; the form is empty"
        raise RequestError(400, f"missing form field '{field}': send the image file{'s' if many else ''} "
                                f"as '{field}' (e.g. {example}){got}", "missing_field")
    unknown = [n for n in names if n != field and n not in route.options]
    if unknown:
        optional = " or ".join(f"'{o}'" for o in route.options)
        raise RequestError(400, f"unexpected form field(s) {', '.join(map(repr, unknown))}; "
                                f"expected '{field}' and optionally {optional}", "unknown_field")
    options = [o for o in route.options if o != TOP_K_FIELD]
    for option in options:
        given = form.getlist(option)
        if len(given) > 1 or any(not isinstance(v, str) for v in given):
            raise RequestError(400, f"'{option}' must be one plain form value", "bad_option")
    values = form.getlist(field)
    if not many and len(values) > 1:
        raise RequestError(400, f"expected one '{field}' field, got {len(values)}; "
                                f"use /classify_batch with repeated 'images' fields for several images",
                           "too_many_images")
    if len(values) > max_files:
        raise RequestError(413, f"too many images: {len(values)} in one request, the limit is {max_files}",
                           "too_many_images")
    files = []
    for i, value in enumerate(values):
        label = f"'{field}'" if not many else f"'{field}' #{i + 1}"
        if not isinstance(value, UploadFile):
            raise RequestError(400, f"form field {label} must be a file upload (e.g. {example}), "
                                    f"not a text value", "text_not_file")
        name = value.filename or ""
        if len(name.encode()) > MAX_FILENAME_BYTES or "\0" in name:
            raise RequestError(400, f"form field {label}: the filename is longer than {MAX_FILENAME_BYTES} "
                                    f"bytes or holds a NUL byte; rename the file", "bad_filename")
        files.append(UploadedFile(name, await value.read()))
    kwargs: dict[str, Any] = {field: files if many else files[0]}
    kwargs.update({o: form.get(o) for o in options if o in form})
    if TOP_K_FIELD in route.options:
        kwargs[TOP_K_FIELD] = parse_top_k([*form.getlist(TOP_K_FIELD), *request.query_params.getlist(TOP_K_FIELD)])
    return kwargs
