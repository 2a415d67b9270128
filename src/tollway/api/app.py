"""The ASGI app factory: routes, the body limit, the error table, OpenAPI — over a running service.

:func:`create_app` is the HTTP half of the composition root. It receives everything already
built — the running :class:`~tollway.service.Service` (with its conservation guard and
metrics), the :class:`~tollway.api.auth.Authenticator`, and optionally a price table — and
only wires them to routes; it opens nothing and reads no
environment, so tests build an app around a service on ``tmp_path`` and call it in-process.

In front of everything, the hot path (:mod:`tollway.api.hot`: the gateway's billing routes
answered without the middleware stack and the router's per-request machinery, the same way the
routes answer them); then FastAPI's own middleware and the body limit (413 before parsing).
Errors of every kind are turned into the
stable body by :mod:`tollway.api.errors`. ``/openapi.json`` is generated from the handlers and
the pydantic schemas; ``/docs`` renders it with Swagger UI served from an installed package
(:mod:`tollway.api.docs`), so it works without internet.
"""

from __future__ import annotations

from typing import Final

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.types import ASGIApp, Receive, Scope, Send

from tollway.api import docs, routes_accounts, routes_billing, routes_ops
from tollway.api.auth import Authenticator
from tollway.api.context import AppContext
from tollway.api.errors import install_error_handlers
from tollway.api.hot import HotPath
from tollway.api.limits import BodyLimit
from tollway.core.pricing import PriceTable
from tollway.guard import GuardRunner
from tollway.metrics import Metrics
from tollway.pricing import default_prices
from tollway.service import Service

NO_OPENTELEMETRY: Final[TelemetryConfig] = {"tracing": False, "metrics": False, "logs": False}
"""FastAPI's OpenTelemetry hooks, off: tollway reports through Prometheus (``/metrics``) and its
JSON logs, and the hooks would look for configured providers on every request (~4.5 µs each)."""
API_TITLE: Final = "tollway"
API_VERSION: Final = "1"
API_DESCRIPTION: Final = """\
The billing loop for AI-inference gateways: **reserve** the worst-case cost before a model
call, **commit** the actual cost (or **release** the hold) after it.

Amounts are micro-USD (10⁻⁶ USD) as decimal strings named `*_micro` (JSON integers are accepted
on input); credit units are `*_cu`. Every error is `{"error": code, "message": …, …details}`.
Authenticate with `Authorization: Bearer <JWT>` carrying the scopes `billing:read`,
`billing:gateway` or `billing:admin` (admin ⊃ gateway ⊃ read) and optionally `accounts`.
"""


class TollwayAPI(FastAPI):
    """FastAPI with a front door: ``front`` (the hot path) sees each request before the middleware stack."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand the request to ``front`` when there is one (it passes what it does not answer to :meth:`full`)."""
        if self.front is None:
            await self.full(scope, receive, send)
            return
        scope["app"] = self  # what Starlette sets; the hot path finds the service through it
        await self.front(scope, receive, send)

    async def full(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The whole FastAPI app: middleware stack, router, error handlers."""
        await super().__call__(scope, receive, send)


def create_app(
    service: Service,
    *,
    authenticator: Authenticator,
    pricing: PriceTable | None = None,
    guard: GuardRunner | None = None,
    metrics: Metrics | None = None,
    hot_path: bool = True,
) -> TollwayAPI:
    """The HTTP API over ``service``.

    ``pricing`` defaults to the shipped price table; ``guard`` and ``metrics`` to the service's own.
    ``hot_path=False`` leaves every request to the router (the differential test compares both).
    """
    app = TollwayAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,  # tollway.api.docs serves /docs with local assets (FastAPI's loads them from a CDN)
        redoc_url=None,
        redirect_slashes=False,  # "/v1/reservations/" is a 404 with the error body, not a 307 to follow
        telemetry=NO_OPENTELEMETRY,
    )
    app.state.tollway = AppContext(
        service,
        authenticator,
        pricing if pricing is not None else default_prices(),
        guard if guard is not None else service.guard,
        metrics if metrics is not None else service.metrics,
    )
    for module in (routes_billing, routes_accounts, routes_ops, docs):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit_bytes=service.settings.http_body_bytes_max)
    if hot_path:
        app.front = HotPath(app.full, service.settings.http_body_bytes_max)
    return app
