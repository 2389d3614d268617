"""ErrorShapeMiddleware in-process: real Starlette apps behind it, driven through httpx's ASGI transport.

The served checks (test_error_shape.py) go through `bentoml serve`; these reach every branch of
errors.py in one process, so a change to it fails here too (and mutation testing sees them).
"""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from vit_service.serving.errors import (MAX_MESSAGE_CHARS, MAX_PATH_CHARS, NO_SUCH_PATH, NOT_READY, ErrorShapeMiddleware,
                                        RequestError, error_response, not_allowed, shaped_message)


async def _answer(app, method: str = "GET", path: str = "/", **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=ErrorShapeMiddleware(app), raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, **kw)


def _raw_app(status: int, body: bytes, headers: list[tuple[bytes, bytes]], chunks: int = 1):
    """A bare ASGI app answering `status` with `body`, sent in `chunks` pieces."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        size = -(-len(body) // chunks) if body else 0
        pieces = [body[i:i + size] for i in range(0, len(body), size)] if body else [b""]
        for i, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1})
    return app


def _routes(*routes: Route) -> Starlette:
    return Starlette(routes=list(routes))


@pytest.mark.anyio
async def test_starlette_404_and_405_get_our_messages_and_keep_allow() -> None:
    async def ok(request):
        return PlainTextResponse("fine")

    app = _routes(Route("/x", ok, methods=["GET"]))
    missing = await _answer(app, "GET", "/nowhere")
    assert missing.status_code == 404 and missing.json() == {"error": NO_SUCH_PATH}
    assert missing.headers["content-type"] == "application/json"
    assert int(missing.headers["content-length"]) == len(missing.content)
    wrong = await _answer(app, "PUT", "/x")
    assert wrong.status_code == 405
    allow = wrong.headers["allow"]  # kept from Starlette's answer (its order follows a set's)
    assert sorted(allow.split(", ")) == ["GET", "HEAD"]
    assert wrong.json() == {"error": f"method PUT is not allowed on /x; use {allow}"}
    assert [k for k in wrong.headers if k == "content-type"] == ["content-type"]  # replaced, not doubled


@pytest.mark.anyio
async def test_good_answers_stream_through_untouched() -> None:
    async def stream(request):
        async def parts():
            yield b"a,"
            yield b"b"
        return StreamingResponse(parts(), media_type="text/csv", headers={"x-kept": "1"})

    answer = await _answer(_routes(Route("/s", stream)), "GET", "/s")
    assert answer.status_code == 200 and answer.content == b"a,b"
    assert answer.headers["content-type"].startswith("text/csv") and answer.headers["x-kept"] == "1"
    redirect = await _answer(_raw_app(302, b"moved", [(b"location", b"/y")]))
    assert redirect.status_code == 302 and redirect.content == b"moved"  # < 400: not an error


@pytest.mark.anyio
async def test_our_own_error_shape_is_kept_byte_for_byte() -> None:
    body = b'{"error": "bad top_k"}'
    answer = await _answer(_raw_app(400, body, [(b"content-type", b"application/json"), (b"x-kept", b"yes")], chunks=3))
    assert answer.status_code == 400 and answer.content == body and answer.headers["x-kept"] == "yes"


@pytest.mark.anyio
@pytest.mark.parametrize("status, content_type, body, message", [
    (400, b"application/json; charset=utf-8", b'{"error": "from json", "detail": []}', "from json"),
    (422, b"application/json", b'{"detail": "no error key"}', "Unprocessable Entity"),
    (400, b"application/json", b'{"error": ""}', "Bad Request"),
    (400, b"application/json", b'not json at all', "Bad Request"),
    (400, b"application/json", b'["error"]', "Bad Request"),
    (429, b"text/plain; charset=utf-8", b"  too many requests for now \n", "too many requests for now"),
    (502, b"text/html", b"<html><body>Bad gateway</body></html>", "Bad Gateway"),
    (503, b"text/plain", b"Service Unavailable: __is_ready__ returned False", NOT_READY),
    (500, b"text/plain", b"Internal Server Error", "internal error; see the server log"),
    (500, b"text/plain", b"", "internal error; see the server log"),
    (504, b"text/plain", b"line one\nline two", "Gateway Timeout"),
    (413, b"text/plain", b"x" * (MAX_MESSAGE_CHARS + 1), "Request Entity Too Large"),
    (400, b"text/plain", b"y" * MAX_MESSAGE_CHARS, "y" * MAX_MESSAGE_CHARS),
    (599, b"text/html", b"<p>odd</p>", "HTTP 599"),
    (400, b"text/plain", "caf\xe9 \u2603".encode() + b"\xff", "caf\xe9 \u2603\ufffd"),
])
async def test_other_error_answers_get_our_shape_with_their_status(status, content_type, body, message) -> None:
    answer = await _answer(_raw_app(status, body, [(b"content-type", content_type), (b"retry-after", b"3"),
                                                   (b"content-length", str(len(body)).encode())], chunks=2))
    assert answer.status_code == status
    assert json.loads(answer.content) == {"error": message}
    assert answer.headers["retry-after"] == "3"
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["content-length"] == str(len(answer.content))


@pytest.mark.anyio
async def test_an_exception_before_the_answer_is_a_logged_500_in_our_shape() -> None:
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("bentoml.vit_service.errors")
    logger.addHandler(handler)
    try:
        answer = await _answer(broken, "POST", "/classify")
    finally:
        logger.removeHandler(handler)
    assert answer.status_code == 500 and answer.json() == {"error": "internal error; see the server log"}
    [record] = records
    assert record.getMessage() == "unhandled error on POST /classify" and record.exc_info[0] is RuntimeError


@pytest.mark.anyio
async def test_an_exception_after_the_answer_began_is_raised_again() -> None:
    async def half(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"par", "more_body": True})
        raise RuntimeError("cut")

    with pytest.raises(RuntimeError, match="cut"):
        await _answer(half)


def test_messages_for_framework_answers() -> None:
    scope = {"method": "DELETE", "path": "/" + "p" * 300}
    cut = shaped_message(405, "text/plain", b"Method Not Allowed", scope, None)
    assert cut == "method DELETE is not allowed on /" + "p" * (MAX_PATH_CHARS - 1)  # no "; use" without Allow
    assert shaped_message(405, "", b"", {}, "GET, HEAD") == "method  is not allowed on ; use GET, HEAD"
    assert shaped_message(405, "text/plain", b"only GET here", scope, "GET") == "only GET here"
    assert shaped_message(404, "text/plain", b"model foo not found", {}, None) == "model foo not found"
    assert shaped_message(503, "text/plain", b"down for maintenance", {}, None) == "down for maintenance"
    assert shaped_message(500, "text/plain", b"disk full", {}, None) == "disk full"
    assert shaped_message(404, "application/json", b'{"error": "Not Found"}', {}, None) is None  # already ours
    assert not_allowed("GET", "/a", "POST") == "method GET is not allowed on /a; use POST"


def test_request_error_and_error_response() -> None:
    e = RequestError(415, "not an upload")
    assert (e.status, e.message, e.reason, str(e)) == (415, "not an upload", "bad_request", "not an upload")
    assert RequestError(400, "m", "bad_image").reason == "bad_image"
    response = error_response(429, "slow down", {"retry-after": "1"})
    assert response.status_code == 429 and json.loads(response.body) == {"error": "slow down"}
    assert response.media_type == "application/json" and response.headers["retry-after"] == "1"
    assert error_response(400, "x").headers["content-type"] == "application/json"


async def _raw_call(app, scope_extra: dict | None = None) -> list[dict]:
    """Drives the middleware with ASGI messages directly; returns what it sent."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/p", "headers": [], **(scope_extra or {})}
    await ErrorShapeMiddleware(app)(scope, receive, send)
    return sent


@pytest.mark.anyio
async def test_shaped_answers_carry_lowercase_asgi_headers_even_from_bare_messages() -> None:
    async def bare(scope, receive, send):  # no headers, a body message without "body": both optional in ASGI
        await send({"type": "http.response.start", "status": 404})
        await send({"type": "http.response.body"})

    start, body = await _raw_call(bare)
    assert start["status"] == 404 and json.loads(body["body"]) == {"error": NO_SUCH_PATH}
    assert start["headers"] == [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body["body"])).encode())]


@pytest.mark.anyio
async def test_an_exception_after_an_error_answer_went_out_is_raised_not_answered_twice() -> None:
    async def late(scope, receive, send):
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"bad"})
        raise RuntimeError("after")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    with pytest.raises(RuntimeError, match="after"):
        await ErrorShapeMiddleware(late)({"type": "http", "path": "/"}, None, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert json.loads(sent[1]["body"]) == {"error": "bad"}


@pytest.mark.anyio
async def test_other_scopes_get_the_same_receive_and_send() -> None:
    seen = []

    async def receive():
        return {}

    async def send(message):
        pass

    async def app(scope, receive_, send_):
        seen.append((scope["type"], receive_ is receive, send_ is send))

    await ErrorShapeMiddleware(app)({"type": "websocket"}, receive, send)
    assert seen == [("websocket", True, True)]


def test_an_empty_404_or_one_without_a_content_type_is_ours() -> None:
    assert shaped_message(404, "text/plain", b"", {}, None) == NO_SUCH_PATH
    assert shaped_message(404, "", b"Not Found", {}, None) == NO_SUCH_PATH


@pytest.mark.anyio
async def test_a_body_message_without_body_is_an_empty_body() -> None:
    async def bare(scope, receive, send):
        await send({"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body"})

    _, body = await _raw_call(bare)
    assert json.loads(body["body"]) == {"error": "Bad Gateway"}
