"""Plain HTTP routes (GET pages, JSON) that are methods of a BentoML service, using `self`.

BentoML's `@bentoml.api` routes are POST only. For other routes BentoML mounts an ASGI app with
`@bentoml.asgi_app`, and binds FastAPI routes declared inside the class to the running service.
This does the same for a Starlette app (no FastAPI needed):

    routes = ServiceRoutes()

    @bentoml.asgi_app(routes.app, path="/")
    @bentoml.service
    class Service:
        @routes.get("/hello")
        async def hello(self, request: Request) -> Response: ...

At request time the method is called on the service instance of the worker
(`bentoml.get_current_service()`, public API).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Method = Callable[[Any, Request], Awaitable[Response]]


class ServiceRoutes:
    def __init__(self) -> None:
        self.app = Starlette()

    def get(self, path: str) -> Callable[[Method], Method]:
        """Registers the decorated method for GET `path`; returns it unchanged."""

        def register(method: Method) -> Method:
            async def endpoint(request: Request) -> Response:
                import bentoml

                return await method(bentoml.get_current_service(), request)

            self.app.router.routes.append(Route(path, endpoint, methods=["GET"], name=method.__name__))
            return method

        return register

    @property
    def paths(self) -> set[str]:
        return {route.path for route in self.app.router.routes if isinstance(route, Route)}
