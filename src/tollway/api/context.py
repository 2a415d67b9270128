"""What every handler reaches: the running service, the authenticator and the optional parts.

:class:`AppContext` is built once by :func:`tollway.api.app.create_app` and kept in
``app.state``; handlers fetch it with :func:`context`. The scope dependencies (``Reader``,
``Gateway``, ``Admin``) verify the bearer token and check the scope; the account check needs
the request's account and is done in the handler with ``principal.require(scope, account)``
(or by :meth:`AppContext.entry_for` for a request that names an entry).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tollway.api.auth import Authenticator, Principal, Scope
from tollway.api.errors import ApiError
from tollway.core.ids import check_entry_id
from tollway.core.pricing import PriceTable
from tollway.core.state import Entry
from tollway.engine import Engine
from tollway.finalizer import FinalizeWorker
from tollway.guard import GuardRunner
from tollway.metrics import Metrics
from tollway.service import Service

BEARER: Final = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description="A JWT (ES256 or EdDSA) with `scope` (billing:read, billing:gateway, billing:admin) "
    "and optionally `accounts` (exact ids or prefix* patterns).",
)


@dataclass(frozen=True, slots=True)
class AppContext:
    """The service and the parts the handlers use."""

    service: Service
    authenticator: Authenticator
    pricing: PriceTable
    guard: GuardRunner
    metrics: Metrics

    @property
    def engine(self) -> Engine:
        """The single writer."""
        return self.service.engine

    async def entry_for(self, principal: Principal, scope: Scope, billing_entry_id: str) -> Entry | None:
        """The entry a request names, after checking the caller may touch its account.

        A malformed id is a 400; an unknown one returns None (the engine answers ``not_found``).
        A settled entry is read back from the log (a repeat, or a move it can no longer make).
        """
        check_entry_id(billing_entry_id)
        entry = await self.engine.peek_entry(billing_entry_id)
        if entry is not None:
            principal.require(scope, entry.account_id)
        return entry


def context(request: Request) -> AppContext:
    """The app's context."""
    found: AppContext = request.app.state.tollway
    return found


def _needs(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> Principal:
        token = credentials.credentials if credentials is not None else None
        principal = context(request).authenticator.authenticate(token)
        principal.require(scope)
        return principal

    dependency.__name__ = f"needs_{scope.name.lower()}"
    return dependency


Reader = Annotated[Principal, Security(_needs(Scope.READ))]
Gateway = Annotated[Principal, Security(_needs(Scope.GATEWAY))]
Admin = Annotated[Principal, Security(_needs(Scope.ADMIN))]


def require_worker(ctx: AppContext) -> FinalizeWorker:
    """The finalize worker; 409 ``settlement_not_configured`` in standalone mode."""
    if ctx.service.worker is None:
        raise ApiError(
            "settlement_not_configured",
            "standalone mode: no settlement service is configured (set settlement_url), so there is no "
            "finalize worker or breaker",
        )
    return ctx.service.worker
