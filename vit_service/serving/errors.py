"""One error shape: every non-2xx answer of the service is `{"error": "<what was wrong>"}` JSON.

Errors are shaped where they are raised: the client's mistakes are `RequestError`, raised by the
routes and the HTTP front (http.py) and answered there with `error_response`; auth.py answers its
401 the same way. What the frameworks answer around our code (Starlette's 404 and 405, /readyz's
503, BentoML's 429 over max_concurrency and 504 past the timeout, a 500 from an exception nobody
caught) passes `ErrorShapeMiddleware`, the outermost layer: a JSON body with an "error" text is
kept, anything else (plain text, HTML) becomes `{"error": ...}` with the status and headers kept.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("bentoml.vit_service.errors")
MAX_MESSAGE_CHARS = 300  # a plain-text body longer than this is not a message: the status says it
MAX_PATH_CHARS = 100  # a path echoed back in a 405 message is cut to this length

OVERLOADED = "the model is overloaded; retry shortly"
NOT_READY = "the model is still warming up; retry shortly"
NO_SUCH_PATH = "no such path (the API is described at /docs)"


class RequestError(Exception):
    """Something wrong with the client's request, answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason  # a short fixed label for the rejected-uploads metric


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, headers=headers, media_type="application/json")


def not_allowed(method: str, path: str, allow: str | None) -> str:
    return f"method {method} is not allowed on {path[:MAX_PATH_CHARS]}" + (f"; use {allow}" if allow else "")


def shaped_message(status: int, content_type: str, body: bytes, scope: Scope, allow: str | None) -> str | None:
    """The message for an error answer from outside our code, or None when it already has our shape."""
    text = body.decode("utf-8", "replace").strip()
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json":
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and set(data) == {"error"} and isinstance(data["error"], str) and data["error"]:
            return None
        text = str(data["error"]) if isinstance(data, dict) and data.get("error") else ""
    elif media != "text/plain":
        text = ""  # HTML or bytes: not a message
    if status == 404 and text in ("", "Not Found"):
        return NO_SUCH_PATH  # (not echoing the path: unknown paths are one metrics label too)
    if status == 405 and text in ("", "Method Not Allowed"):
        return not_allowed(scope.get("method", ""), str(scope.get("path", "")), allow)
    if status == 503 and "__is_ready__" in text:  # BentoML's /readyz
        return NOT_READY
    if status == 500 and text in ("", "Internal Server Error"):
        return "internal error; see the server log"
    if text and len(text) <= MAX_MESSAGE_CHARS and "\n" not in text:
        return text[:MAX_MESSAGE_CHARS]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


class ErrorShapeMiddleware:
    """Rewrites an error answer (status >= 400) that is not `{"error": "<str>"}` JSON into it.

    Only error answers are held back (their body is small); any other answer streams through
    untouched. An exception escaping the app before an answer began becomes a 500 in our shape
    (logged with its traceback).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # (uvicorn drops the body of an answer to HEAD itself)
            return await self.app(scope, receive, send)
        held: Message | None = None
        chunks: list[bytes] = []
        forwarded = False  # whether anything of the answer went out yet

        async def shaping_send(message: Message) -> None:
            nonlocal held, forwarded
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start, held, forwarded = held, None, True
                await self._send_shaped(scope, start, b"".join(chunks), send)
                return
            forwarded = True
            await send(message)

        try:
            await self.app(scope, receive, shaping_send)
        except Exception:
            if forwarded:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await _send_error(send, 500, "internal error; see the server log", [])

    @staticmethod
    async def _send_shaped(scope: Scope, start: Message, body: bytes, send: Send) -> None:
        raw_headers = list(start.get("headers", []))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        message = shaped_message(start["status"], headers.get("content-type", ""), body, scope, headers.get("allow"))
        if message is None:
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        kept = [(k, v) for k, v in raw_headers if k.lower() not in (b"content-type", b"content-length")]
        await _send_error(send, start["status"], message, kept)


async def _send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = error_body(message)
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
