"""One error shape: every non-2xx answer of the service is `{"error": "<what was wrong>"}` JSON.

The client's mistakes are one exception, `RequestError`, raised by every route and the upload
middleware; `error_response` is the one place that turns it into a response (auth.py answers its
401 the same way).

Everything else is caught on its way out by `ErrorShapeMiddleware`. BentoML's 429
(max_concurrency) and 504 (timeout) are JSON already; what is not: Starlette's plain-text `Not
Found` (unknown path) and `Method Not Allowed`, BentoML's plain-text 503 from /readyz and /livez,
the list-shaped `[{"error": ...}]` of `BadInput`, `{"error": ..., "detail": [...]}` from a typed
route's validation, and the plain-text 500 of an exception nobody caught. The middleware rewrites
those bodies, keeping the status and every other header; a body already in our shape passes
untouched. Registered with `Service.add_asgi_middleware` before the other middlewares of ours, so
it sits outside them (BentoML puts user middlewares inside its timeout and concurrency limits)
and sees every answer from the routes and from our own checks.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("bentoml.vit_service.errors")
MAX_MESSAGE_CHARS = 300  # a plain-text body longer than this is not a message: the status says it
MAX_PATH_CHARS = 100  # a path echoed back in a 405 message is cut to this length


class RequestError(Exception):
    """Something wrong with the client's request, answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason  # a short fixed label for the rejected-uploads metric


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


OVERLOADED = "the model is overloaded; retry shortly"
NOT_READY = "the model is still warming up; retry shortly"
TIMED_OUT = "the model did not answer in time"


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def error_message(status: int, content_type: str, body: bytes, scope: Scope,
                  headers: dict[str, str]) -> str | None:
    """The message for an error answer, or None when `body` is already `{"error": "<str>"}`."""
    text = body.decode("utf-8", "replace").strip()
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and set(data) == {"error"} and isinstance(data["error"], str) and data["error"]:
            return None
        if isinstance(data, dict) and data.get("detail"):
            # BentoML's typed routes: {"error": "1 validation error for Input", "detail": [pydantic errors]};
            # FastAPI / Starlette style: {"detail": "..."}
            detail = data["detail"]
            if isinstance(detail, list):
                detail = "; ".join(_pydantic_error(d) for d in detail)
            head = f"{data['error']}: " if isinstance(data.get("error"), str) and data["error"] else ""
            return f"{head}{detail}"[:MAX_MESSAGE_CHARS]
        if isinstance(data, list):  # BentoML's BadInput: [{"error": ...}, ...]
            found = [str(d["error"]) for d in data if isinstance(d, dict) and d.get("error")]
            if found:
                return "; ".join(found)[:MAX_MESSAGE_CHARS]
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])[:MAX_MESSAGE_CHARS]
        text = ""  # JSON of another shape: say what the status says
    elif media != "text/plain":
        text = ""  # HTML or bytes: not a message
    method, path = scope.get("method", ""), str(scope.get("path", ""))[:MAX_PATH_CHARS]
    if status == 404 and text in ("", "Not Found"):
        # (not echoing the path: BentoML's metrics see unknown paths folded into one, and so do we)
        return "no such path (the API is described at /docs)"
    if status == 405 and text in ("", "Method Not Allowed"):
        allow = headers.get("allow")
        return f"method {method} is not allowed on {path}" + (f"; use {allow}" if allow else "")
    if status == 503 and "__is_ready__" in text:
        return "not ready: the model is still warming up; retry shortly"
    if status == 500 and text in ("", "Internal Server Error"):
        return "internal error; see the server log"
    if text and len(text) <= MAX_MESSAGE_CHARS and "\n" not in text:
        return text
    return reason_phrase(status)


def _pydantic_error(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    where = ".".join(str(part) for part in d.get("loc", ()))
    return f"{where}: {d.get('msg', '')}" if where else str(d.get("msg", d))


class ErrorShapeMiddleware:
    """Rewrites every error answer (status >= 400) that is not `{"error": "<str>"}` JSON into it.

    Only error answers are held back (their body is small); any other answer streams through
    untouched. An exception escaping the app before an answer began becomes a 500 in our shape
    (logged with its traceback), rather than Starlette's plain-text one.
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
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
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
        message = error_message(start["status"], headers.get("content-type", ""), body, scope, headers)
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
