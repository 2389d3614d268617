"""Every place this project relies on BentoML's private API, in one module (bentoml 1.4.x).

Each patch states what it relies on; tests/test_bentoml_compat.py checks each of those facts
against the installed BentoML, so an upgrade that moves them fails a test instead of silently
undoing the patch.
"""

from __future__ import annotations

from typing import Any

UNKNOWN_PATH = "/__unknown__"
# BentoML's own routes and the Swagger UI's static files: never folded.
BENTOML_PATHS = {"/metrics", "/healthz", "/livez", "/readyz", "/schema.json"}
BENTOML_PREFIXES = ("/static_content/", "/assets/")
_known_paths: set[str] = set(BENTOML_PATHS)


def label_metrics_with_model(tag: Any) -> None:
    """BentoML labels its metrics service_version="not available" when serving from source
    rather than from a built Bento: label them with the model tag instead.

    Relies on: `bentoml._internal.context.server_context.bento_version`, read when the metrics
    are labelled."""
    from bentoml._internal.context import server_context

    if server_context.bento_version == "not available":
        server_context.bento_version = str(tag)


def keep_one_session(dependency: Any) -> None:
    """Stops BentoML's dependency client from replacing its HTTP session every 100 calls.

    BentoML 1.4.30+ (proxy2) swaps the aiohttp session every 100 calls and 5 minutes and closes
    the old one under the calls still in flight; the caller retries those, but at 32 concurrent
    requests that redoes up to a third of the work. To a local model service one session is fine.

    Relies on: `dependency.to_async._session_manager` with attributes `max_requests` and `max_age`.
    A no-op in-process, or if BentoML's client changes (the test says so). (bentoml 1.4.40 also
    reads a `runner_connection` service config with the same two values; 1.4.30, the oldest
    version pyproject.toml allows, has neither that config nor the session swapping.)"""
    manager = getattr(getattr(dependency, "to_async", None), "_session_manager", None)
    if manager is not None and hasattr(manager, "max_requests") and hasattr(manager, "max_age"):
        manager.max_requests = manager.max_age = float("inf")


def fold_unknown_paths(known_paths: set[str]) -> None:
    """Makes BentoML's per-endpoint traffic metrics label every unknown path as one.

    BentoML 1.4 labels its request counters and latency histograms with the raw request path, so
    each request to a new made-up path adds ~20 series to /metrics: a scanner could grow the
    server's memory without limit. It has no setting for this, so its metrics middleware is
    wrapped here: a request to a path no route serves reaches it (and the app behind it, which
    answers 404 either way) as UNKNOWN_PATH. Known paths (`known_paths`, added up over the calls:
    each service names its own routes, and BentoML's) pass untouched.

    Relies on: `bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware`, an ASGI
    middleware class whose `__call__(scope, receive, send)` reads `scope["path"]`."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    _known_paths.update(known_paths)
    call = RunnerTrafficMetricsMiddleware.__call__
    if getattr(call, "folds_unknown_paths", False):
        return

    async def folding_call(self, scope, receive, send):  # type: ignore[no-untyped-def]
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in _known_paths and not path.startswith(BENTOML_PREFIXES):
            scope = {**scope, "path": UNKNOWN_PATH, "raw_path": UNKNOWN_PATH.encode()}
        await call(self, scope, receive, send)

    folding_call.folds_unknown_paths = True  # type: ignore[attr-defined]
    RunnerTrafficMetricsMiddleware.__call__ = folding_call  # type: ignore[method-assign]
