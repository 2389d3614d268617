"""One test per patch of BentoML's private API (vit_service/serving/bentoml_compat.py): each checks
that what the patch relies on is still there and still does what the patch assumes, so a BentoML
upgrade that moves it fails here. (The patches' effects are also tested on a real server:
test_service.py checks service_version and the folded unknown paths.)"""

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


def test_worker_index_reads_the_server_context(monkeypatch: pytest.MonkeyPatch) -> None:
    from bentoml._internal.context import server_context

    monkeypatch.setattr(server_context, "worker_index", 2)
    assert bentoml_compat.worker_index() == 2
    monkeypatch.setattr(server_context, "worker_index", None)  # outside a BentoML worker
    assert bentoml_compat.worker_index() == 1


def test_api_paths_are_the_post_operations_bentoml_documents() -> None:
    from vit_service.serving.service import ViTClassifier

    paths = bentoml_compat.api_paths(ViTClassifier)
    assert set(paths) == {api.route for api in ViTClassifier.apis.values()}
    assert set(paths["/model_info"]) == {"post"} and paths["/classify"]["post"]["x-bentoml-name"] == "classify"
    # what docs_json restores: BentoML's spec keeps only the mounted app's GET on /model_info
    assert set(ViTClassifier.openapi_spec.asdict()["paths"]["/model_info"]) == {"get"}


def test_cork_dispatcher_batches_splits_and_cancels_as_relied_on() -> None:
    import numpy as np
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    assert {"max_latency_in_ms", "max_batch_size", "fallback", "get_batch_size"} <= set(
        inspect.signature(CorkDispatcher.__init__).parameters)
    seen: list[int] = []

    async def run(arrays):
        seen.append(sum(len(a) for a in arrays))
        return [a * 2 for a in arrays]

    class Late(Exception):
        pass

    async def main():
        call = bentoml_compat.cork_dispatcher(run, 60_000, 4, Late)
        return await asyncio.gather(*[call(np.full(3, v)) for v in range(3)])

    out = asyncio.run(main())
    assert [o.tolist() for o in out] == [[0] * 3, [2] * 3, [4] * 3]  # each call's own outputs, whole
    assert max(seen) <= 4 and sum(seen) == 9  # batches capped, the 3-item calls split to fit


def test_fold_unknown_paths_keeps_routes_with_parameters() -> None:
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    seen: list[str] = []

    async def original(self, scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope["path"])

    saved = RunnerTrafficMetricsMiddleware.__call__
    RunnerTrafficMetricsMiddleware.__call__ = original  # type: ignore[method-assign]
    try:
        bentoml_compat.fold_unknown_paths({"/v2/models/{name}/infer"})
        call = RunnerTrafficMetricsMiddleware.__call__
        for path in ("/v2/models/vit-classifier/infer", "/v2/models/a/b/infer"):
            asyncio.run(call(None, {"type": "http", "path": path}, None, None))
    finally:
        RunnerTrafficMetricsMiddleware.__call__ = saved  # type: ignore[method-assign]
    assert seen == ["/v2/models/vit-classifier/infer", bentoml_compat.UNKNOWN_PATH]
