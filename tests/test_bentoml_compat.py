"""One test per patch of BentoML's private API (vit_service/serving/bentoml_compat.py): each checks
that what the patch relies on is still there and still does what the patch assumes, so a BentoML
upgrade that moves it fails here. (The patches' effects are also tested on a real server:
test_service.py checks service_version and the folded unknown paths, test_service_modes.py the
one model connection.)"""

from __future__ import annotations

import asyncio
import inspect

import pytest

from vit_service.serving import bentoml_compat


def test_label_metrics_with_model_sets_what_the_metrics_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from bentoml._internal.context import server_context
    from bentoml._internal.server.http import instruments

    assert "server_context.bento_version" in inspect.getsource(instruments)  # where the label comes from
    monkeypatch.setattr(server_context, "bento_version", "not available")  # serving from source
    bentoml_compat.label_metrics_with_model("vit-classifier:abc")
    assert server_context.bento_version == "vit-classifier:abc"
    bentoml_compat.label_metrics_with_model("other:def")  # a built Bento's own version stays
    assert server_context.bento_version == "vit-classifier:abc"


def test_keep_one_session_reaches_the_dependency_clients_session_manager() -> None:
    from _bentoml_impl.client.proxy2 import RemoteProxy

    proxy = RemoteProxy("http://127.0.0.1:1")  # nothing is connected until a call
    manager = proxy.to_async._session_manager
    assert manager.max_requests == 100 and manager.max_age == 300.0  # BentoML's swapping defaults
    bentoml_compat.keep_one_session(proxy)
    assert manager.max_requests == manager.max_age == float("inf")
    manager._request_count, manager._created_at = 10**9, 0.0  # many calls, long ago
    manager._session = object()
    assert manager._should_refresh() is False  # the method that decides a swap honours them


def test_fold_unknown_paths_wraps_the_metrics_middleware_that_reads_the_path() -> None:
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    params = list(inspect.signature(RunnerTrafficMetricsMiddleware.__call__).parameters)
    assert params == ["self", "scope", "receive", "send"]
    source = inspect.getsource(RunnerTrafficMetricsMiddleware)
    assert 'scope["path"]' in source or "scope['path']" in source or 'scope.get("path"' in source

    seen: list[str] = []

    async def original(self, scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope["path"])

    saved = RunnerTrafficMetricsMiddleware.__call__
    RunnerTrafficMetricsMiddleware.__call__ = original  # type: ignore[method-assign]
    try:
        bentoml_compat.fold_unknown_paths({"/classify"})
        call = RunnerTrafficMetricsMiddleware.__call__
        for path in ("/classify", "/no-such-page", "/static_content/x.css", "/metrics"):
            asyncio.run(call(None, {"type": "http", "path": path}, None, None))
    finally:
        RunnerTrafficMetricsMiddleware.__call__ = saved  # type: ignore[method-assign]
    assert seen == ["/classify", bentoml_compat.UNKNOWN_PATH, "/static_content/x.css", "/metrics"]
