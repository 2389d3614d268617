"""Upload checks before BentoML parses: body limit, multipart form checks, JSON errors.

The routes themselves are typed `@bentoml.api` methods (service.py), so BentoML's clients and
OpenAPI spec know them. BentoML 1.4's multipart handling, though, answers most user mistakes with
a 500 or a list-shaped body: a non-image upload, a file under a misnamed field, a PNG labelled
image/jpeg, text where a file belongs (which it even fetches as a URL), a malformed body, a very
long filename; a raised `BadInput` gives a 400 whose body is a list, `[{"error": ...}]`; and it
has no request-body size limit at all (seen with bentoml 1.4.38-1.4.40).
`UploadMiddleware` therefore reads each upload to the upload routes, checks the form (content
type, field names, file vs text, count, `top_k`), and only then replays the same bytes to
BentoML, which can no longer fail on them. Every mistake in a request is a 4xx with
`{"error": "<what was wrong>"}`, and the server keeps serving.

Status codes
    400  not an image, empty, truncated or corrupt image, too many pixels, missing or misnamed
         field, text instead of a file, bad `top_k`, malformed multipart body
    405  not a POST to an upload route (/classify, /classify_batch, /explain)
    408  the upload stopped before the body was complete (client gone, or too slow)
    413  body over the size limit, more images than allowed in one request
    415  not a multipart/form-data request
    429  more requests in flight than `max_concurrency` (BentoML, before we see the request)
    503  the model is overloaded (batch queue past `max_latency_ms`) or not up
    504  the request took longer than the traffic timeout (BentoML)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vit_service.serving.errors import RequestError, error_response
from vit_service.serving.metrics import server_timing
from vit_service.serving.validation import TOP_K_FIELD, parse_top_k

MAX_FILENAME_BYTES = 200  # BentoML names its temporary file after the upload; the OS caps names at 255
UPLOAD_SCOPE_KEY = "vit.upload"  # the checked Upload, for the route
TIMINGS_SCOPE_KEY = "vit.timings"  # {stage: seconds}; the route adds its own stages
HANDOFF, ENTERED, RETURNED = "_handoff", "_entered", "_returned"  # perf_counter marks in the timings


@dataclass(frozen=True)
class UploadRoute:
    field: str  # the form field holding the image file(s)
    many: bool = False  # repeated field allowed
    options: tuple[str, ...] = ()  # other plain-text form fields the route takes (checked by the route)


@dataclass
class Upload:
    files: list[tuple[str, bytes]]  # (filename, content) in upload order
    top_k: int | None


class UploadMiddleware:
    """Body limit for every route; for the upload routes, reads and checks the whole form first.

    BentoML 1.4 has no body limit. A declared length over `max_bytes` is refused before reading a
    byte; otherwise the body is counted as it arrives and the read that crosses the limit is a 413.
    For POST to `routes`, the body is read here (bounded), parsed and checked: a mistake is
    answered here as JSON; a good upload is stored in the scope and its bytes replayed to BentoML.
    `on_reject(reason)` is called for every upload refused here (the rejected-uploads metric),
    `on_timings(stages)` once per upload-route response, whose Server-Timing header lists them.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, routes: dict[str, UploadRoute],
                 max_files: Callable[[], int], on_reject: Callable[[str], None] | None = None,
                 on_timings: Callable[[dict[str, float]], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.routes = routes
        self.max_files = max_files
        self.on_reject = on_reject or (lambda reason: None)
        self.on_timings = on_timings or (lambda timings: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.routes.get(scope["path"])
        timings: dict[str, float] = {}
        send = self._timed(send, timings) if route is not None else send
        try:
            declared = Headers(scope=scope).get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise RequestError(413, self._too_large(), "body_too_large")
            if route is None:
                return await self._counted(scope, receive, send)
            if scope["method"] != "POST":
                return await error_response(405, "Method Not Allowed", {"allow": "POST"})(scope, receive, send)
            start = time.perf_counter()
            body = await self._read_body(receive)
            read_done = time.perf_counter()
            upload = await read_upload(scope, body, route, self.max_files())
            timings["read"], timings["parse"] = read_done - start, time.perf_counter() - read_done
        except RequestError as e:
            self.on_reject(e.reason)
            return await error_response(e.status, e.message)(scope, receive, send)
        scope[UPLOAD_SCOPE_KEY] = upload
        scope[TIMINGS_SCOPE_KEY] = timings
        timings[HANDOFF] = time.perf_counter()
        await self.app(scope, _replay(body, receive), send)

    def _timed(self, send: Send, timings: dict[str, float]) -> Send:
        """Adds the Server-Timing header to the response and reports the stages once it starts."""

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                now = time.perf_counter()
                if ENTERED in timings and HANDOFF in timings:
                    timings["bentoml"] = timings[ENTERED] - timings[HANDOFF]
                if RETURNED in timings:
                    timings["serialize"] = now - timings[RETURNED]
                stages = {k: v for k, v in timings.items() if not k.startswith("_")}
                if stages:
                    header = (b"server-timing", server_timing(stages).encode())
                    message = {**message, "headers": [*message.get("headers", []), header]}
                    self.on_timings(stages)
            await send(message)

        return timed_send

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
            self.on_reject(e.reason)
            await error_response(e.status, e.message)(scope, receive, send)

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes ({self.max_bytes / 2**20:g} MiB)"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then waits on the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, when the client goes

    return replay


async def read_upload(scope: Scope, body: bytes, route: UploadRoute, max_files: int) -> Upload:
    """Parses and checks a multipart upload: image file(s) under `route.field`, optional `top_k`."""
    field, many = route.field, route.many
    request = Request(scope, _replay(body, _no_more_body))
    example = f"curl -F {field}=@photo.jpg {request.url.path}"
    content_type = request.headers.get("content-type", "")
    # A url-encoded form is parsed too (BentoML's client sends one when no file is given), so
    # its text 'image' gets the "must be a file" answer below.
    if content_type.split(";")[0].strip().lower() not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise RequestError(415, f"expected a multipart/form-data upload with the image in form field "
                                f"'{field}' (e.g. {example}); got Content-Type {content_type or 'none'!r}",
                           "not_multipart")
    try:
        form = await request.form()
    except (MultiPartException, HTTPException) as e:
        message = e.message if isinstance(e, MultiPartException) else e.detail
        raise RequestError(400, f"malformed multipart body: {message}", "malformed_multipart") from None
    try:
        return await _check_form(form, request, field, many, max_files, example, route.options)
    finally:
        await form.close()


async def _check_form(form: FormData, request: Request, field: str, many: bool, max_files: int,
                      example: str, options: tuple[str, ...] = ()) -> Upload:
    names = list(dict.fromkeys(form.keys()))
    if field not in names:
        got = f"; got field(s) {', '.join(map(repr, names))}" if names else "; the form is empty"
        raise RequestError(400, f"missing form field '{field}': send the image file{'s' if many else ''} "
                                f"as '{field}' (e.g. {example}){got}", "missing_field")
    unknown = [n for n in names if n not in (field, TOP_K_FIELD, *options)]
    if unknown:
        optional = " or ".join(f"'{o}'" for o in (TOP_K_FIELD, *options))
        raise RequestError(400, f"unexpected form field(s) {', '.join(map(repr, unknown))}; "
                                f"expected '{field}' and optionally {optional}", "unknown_field")
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
            # BentoML would fetch a text value as a URL: never let one through.
            raise RequestError(400, f"form field {label} must be a file upload (e.g. {example}), "
                                    f"not a text value", "text_not_file")
        name = value.filename or ""
        if len(name.encode()) > MAX_FILENAME_BYTES or "\0" in name:
            raise RequestError(400, f"form field {label}: the filename is longer than {MAX_FILENAME_BYTES} "
                                    f"bytes or holds a NUL byte; rename the file", "bad_filename")
        files.append((name, await value.read()))
    top_k = parse_top_k([*form.getlist(TOP_K_FIELD), *request.query_params.getlist(TOP_K_FIELD)])
    return Upload(files, top_k)


async def _no_more_body() -> Message:
    return {"type": "http.disconnect"}
