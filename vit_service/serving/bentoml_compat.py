"""Every place this project relies on BentoML's private API, in one module (bentoml 1.4.x).

Each patch states what it relies on; tests/test_bentoml_compat.py checks each of those facts
against the installed BentoML, so an upgrade that moves them fails a test instead of silently
undoing the patch.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

UNKNOWN_PATH = "/__unknown__"
# BentoML's own routes and the Swagger UI's static files: never folded.
BENTOML_PATHS = {"/metrics", "/healthz", "/livez", "/readyz", "/schema.json"}
BENTOML_PREFIXES = ("/static_content/", "/assets/")
_known_paths: set[str] = set(BENTOML_PATHS)
_known_templates: list[re.Pattern[str]] = []  # routes with parameters, e.g. /v2/models/{name}/infer


def label_metrics_with_model(tag: Any) -> None:
    """BentoML labels its metrics service_version="not available" when serving from source
    rather than from a built Bento: label them with the model tag instead.

    Relies on: `bentoml._internal.context.server_context.bento_version`, read when the metrics
    are labelled."""
    from bentoml._internal.context import server_context

    if server_context.bento_version == "not available":
        server_context.bento_version = str(tag)


def worker_index() -> int:
    """This worker's index among its service's workers (1, 2, ...; a replacement takes the dead
    worker's); 1 outside a BentoML worker.

    Relies on: `bentoml._internal.context.server_context.worker_index`, set in each worker."""
    from bentoml._internal.context import server_context

    return server_context.worker_index or 1


def cork_dispatcher(callback: Callable[[Sequence[Any]], Awaitable[list[Any]]], max_latency_ms: int,
                    max_batch_size: int, overloaded: type[Exception]) -> Callable[[Any], Awaitable[Any]]:
    """BentoML's adaptive batcher, the one behind its batchable APIs, driven in this process:
    returns `async call(array) -> output`, where `callback(arrays)` runs one batch and returns one
    output per array (batched on axis 0; an array larger than what is left of a batch is split
    and its outputs concatenated again). A call the batcher cancels (it would wait past the
    latency limit) raises `overloaded`.

    Relies on: `bentoml._internal.marshal.dispatcher.CorkDispatcher(max_latency_in_ms,
    max_batch_size, *, fallback, get_batch_size)`, called with the async callback and returning
    the per-call coroutine function; a cancelled call returns `fallback()`."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    def fallback() -> Any:
        raise overloaded()

    return CorkDispatcher(max_latency_ms, max_batch_size, fallback=fallback, get_batch_size=len)(callback)


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

    _known_paths.update(p for p in known_paths if "{" not in p)
    _known_templates.extend(re.compile(re.sub(r"\\{[^}]*\\}", "[^/]+", re.escape(p)) + "$")
                            for p in known_paths if "{" in p)
    call = RunnerTrafficMetricsMiddleware.__call__
    if getattr(call, "folds_unknown_paths", False):
        return

    async def folding_call(self, scope, receive, send):  # type: ignore[no-untyped-def]
        path = scope.get("path", "")
        if (scope["type"] == "http" and path not in _known_paths and not path.startswith(BENTOML_PREFIXES)
                and not any(t.match(path) for t in _known_templates)):
            scope = {**scope, "path": UNKNOWN_PATH, "raw_path": UNKNOWN_PATH.encode()}
        await call(self, scope, receive, send)

    folding_call.folds_unknown_paths = True  # type: ignore[attr-defined]
    RunnerTrafficMetricsMiddleware.__call__ = folding_call  # type: ignore[method-assign]


def api_paths(service: Any) -> dict[str, dict[str, Any]]:
    """The OpenAPI path items BentoML writes for `service`'s typed APIs (their POST operations).

    BentoML's spec merges a mounted FastAPI app's paths over the APIs' paths, so a path served by
    both (GET and POST /model_info) keeps only the app's GET; pages.docs_json puts these back.

    Relies on: `_bentoml_sdk.service.openapi._get_api_routes(svc) -> {route: PathItem}`, whose
    items unstructure to dicts (`bentoml_cattr.unstructure`)."""
    from _bentoml_sdk.service.openapi import _get_api_routes

    from bentoml._internal.utils.cattr import bentoml_cattr

    return {route: bentoml_cattr.unstructure(item) for route, item in _get_api_routes(service).items()}
