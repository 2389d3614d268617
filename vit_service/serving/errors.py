"""The client's mistakes as one exception, answered as `{"error": ...}` JSON with a 4xx (or 503/504).

Every route and the upload middleware raise `RequestError`; `error_response` is the one place
that turns it into a response. An error handler (e.g. auth answering 401) plugs in here.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


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
