"""The Python SDK of the tollway HTTP API: :class:`AsyncClient`, typed results, typed errors.

::

    async with AsyncClient("http://127.0.0.1:8080", token) as billing:
        hold = await billing.reserve("acct-1", "req-42", estimated_cost_micro=20_000)
        try:
            ...  # call the model
        except Exception:
            await billing.release(hold.billing_entry_id, "pre_stream_failure")
            raise
        await billing.commit(hold.billing_entry_id, actual_cost_micro=12_345, response=answer)

Money is a Python ``int`` of micro-USD everywhere in the SDK (the wire's decimal strings are
converted both ways). Results are frozen dataclasses; every error the API answers raises an
:class:`ApiError` subclass chosen by its stable ``code`` (:class:`InsufficientFunds`,
:class:`RequestInProgress`, …) carrying ``status``, ``code``, ``message`` and ``details``; a
network failure raises :class:`TransportFailure`. Both derive from :class:`ClientError`.

The SDK is standalone on purpose: it imports aiohttp, httpx and the standard library only, never
the engine, so a gateway can depend on it without the server's dependencies. Requests go
through one reused ``aiohttp.ClientSession`` (its pool of ``connections_max`` connections): a
gateway pays the SDK's CPU on every model call, and httpx's cost per request grows with the
connections in its pool (``bench/README.md``, "`bench/litellm.py`"). Pass ``transport`` (e.g.
``httpx.ASGITransport(app)``) to talk to an in-process app through httpx instead.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import httpx

from tollway.client.errors import (
    ApiError,
    ClientError,
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    PayloadTooLarge,
    PendingSettlementLimit,
    RequestInProgress,
    ReservationExpired,
    ServiceUnavailable,
    TransportFailure,
    Unauthorized,
    error_from_answer,
)
from tollway.client.results import (
    Balance,
    CreditResult,
    DeadLetter,
    Entry,
    Overrun,
    Page,
    Price,
    RateSnapshot,
    ReplayReport,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "Balance",
    "ClientError",
    "Conflict",
    "CreditResult",
    "DeadLetter",
    "Entry",
    "Forbidden",
    "IdempotencyKeyReused",
    "InsufficientFunds",
    "InvalidRequest",
    "InvalidTransition",
    "NotFound",
    "Overrun",
    "Page",
    "PayloadTooLarge",
    "PendingSettlementLimit",
    "Price",
    "RateSnapshot",
    "ReplayReport",
    "RequestInProgress",
    "ReservationExpired",
    "ServiceUnavailable",
    "TransportFailure",
    "Unauthorized",
]

TIMEOUT_S_DEFAULT: Final = 10.0
CONNECTIONS_MAX_DEFAULT: Final = 100
KEEPALIVE_S: Final = 2.0
"""How long an idle connection is kept: less than servers keep theirs (uvicorn: 5 s), so the SDK
closes it first and never sends a request on a connection the server is closing (which aiohttp
reports as "Can not write request body", and which a POST must not be retried after)."""
PAGE_LIMIT_DEFAULT: Final = 100


_JSON_HEADERS: Final = {"content-type": "application/json"}


def _json(body: Mapping[str, object]) -> bytes:
    """A request body as httpx encodes ``json=``: compact, UTF-8, no NaN."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _environment_proxy(base_url: str) -> str | None:
    """The proxy the environment names for ``base_url`` (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``), if any."""
    parts = urlsplit(base_url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _drop_none(body: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in body.items() if value is not None}


def _wire_micro(value: int | None) -> str | None:
    return None if value is None else str(value)


# -- the client ------------------------------------------------------------------------------


class AsyncClient:
    """An asynchronous client of one tollway service. Close it (``async with`` or :meth:`aclose`).

    ``connections_max`` bounds the connections kept to the service (one request at a time
    each); ``transport`` sends every request through httpx and that transport instead.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = TIMEOUT_S_DEFAULT,
        connections_max: int = CONNECTIONS_MAX_DEFAULT,
    ) -> None:
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._connections_max = connections_max
        self._proxy = _environment_proxy(self._base_url)
        self._session: aiohttp.ClientSession | None = None  # made on the first request, in its event loop
        self._http: httpx.AsyncClient | None = None
        if transport is not None:
            self._http = httpx.AsyncClient(
                base_url=base_url, headers=self._headers, transport=transport, timeout=timeout_s
            )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        if self._http is not None:
            await self._http.aclose()
        if self._session is not None:
            await self._session.close()

    def _aiohttp(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self._connections_max, keepalive_timeout=KEEPALIVE_S),
                # as httpx's timeout: each phase (a free connection, reading), not the whole request
                timeout=aiohttp.ClientTimeout(total=None, connect=self._timeout_s, sock_read=self._timeout_s),
                trust_env=False,  # its proxy lookup costs two thread hops per request: read once, below
            )
        return self._session

    async def _send(
        self, method: str, path: str, body: Mapping[str, object] | None, params: Any
    ) -> tuple[int, bytes, str]:
        """Status, body and Retry-After header ("" when absent) of one request; TransportFailure when none."""
        content = None if body is None else _json(body)
        headers = None if content is None else _JSON_HEADERS
        url = self._base_url + path
        try:
            if self._http is not None:
                response = await self._http.request(method, path, content=content, headers=headers, params=params)
                return response.status_code, response.content, response.headers.get("retry-after", "")
            session = self._aiohttp()
            async with session.request(
                method, url, data=content, headers=headers, params=params, proxy=self._proxy, allow_redirects=False
            ) as answer:
                return answer.status, await answer.read(), answer.headers.get("retry-after", "")
        except (TimeoutError, httpx.HTTPError, aiohttp.ClientError) as exc:
            # the whole URL: a wrong host or port shows at once
            raise TransportFailure(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    async def _call(self, method: str, path: str, body: Mapping[str, object] | None = None, params: Any = None) -> Any:
        """One request; the decoded JSON of a 2xx answer, else the typed error."""
        status, content, retry = await self._send(method, path, body, params)
        if status >= 400:
            raise error_from_answer(status, content, retry)
        return json.loads(content) if content else None

    # -- reservations ----------------------------------------------------------------------

    async def reserve(
        self,
        account_id: str,
        request_id: str,
        *,
        estimated_cost_micro: int | None = None,
        model: str | None = None,
        input_tokens: int | None = None,
        max_output_tokens: int | None = None,
        ttl_s: int | None = None,
        correlation_id: str | None = None,
    ) -> Entry:
        """Hold an amount, or the estimate of ``model`` for the token counts (``replayed`` on a repeat)."""
        body = {
            "account_id": account_id,
            "request_id": request_id,
            "estimated_cost_micro": _wire_micro(estimated_cost_micro),
            "model": model,
            "input_tokens": input_tokens,
            "max_output_tokens": max_output_tokens,
            "ttl_s": ttl_s,
            "correlation_id": correlation_id,
        }
        return Entry.from_json(await self._call("POST", "/v1/reservations", _drop_none(body)))

    async def get_entry(self, billing_entry_id: str) -> Entry:
        """An entry by id."""
        return Entry.from_json(await self._call("GET", f"/v1/reservations/{billing_entry_id}"))

    async def commit(
        self,
        billing_entry_id: str,
        *,
        actual_cost_micro: int | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        model: str | None = None,
        response: Any = None,
    ) -> Entry:
        """Charge the actual cost (or the price of the token counts); store ``response`` if given."""
        body = {
            "actual_cost_micro": _wire_micro(actual_cost_micro),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "model": model,
            "response": response,
        }
        path = f"/v1/reservations/{billing_entry_id}/commit"
        return Entry.from_json(await self._call("POST", path, _drop_none(body)))

    async def release(self, billing_entry_id: str, reason: str = "pre_stream_failure") -> Entry:
        """Return a hold (``pre_stream_failure`` or ``user_cancel``)."""
        path = f"/v1/reservations/{billing_entry_id}/release"
        return Entry.from_json(await self._call("POST", path, {"reason": reason}))

    async def extend(self, billing_entry_id: str, ttl_s: int) -> Entry:
        """Push a hold's expiry to ``ttl_s`` seconds from now."""
        path = f"/v1/reservations/{billing_entry_id}/extend"
        return Entry.from_json(await self._call("POST", path, {"ttl_s": ttl_s}))

    async def charge(
        self,
        account_id: str,
        request_id: str,
        amount_micro: int,
        *,
        allow_partial: bool = False,
        correlation_id: str | None = None,
    ) -> Entry:
        """A direct charge without a hold."""
        body = {
            "account_id": account_id,
            "request_id": request_id,
            "amount_micro": str(amount_micro),
            "allow_partial": allow_partial,
            "correlation_id": correlation_id,
        }
        return Entry.from_json(await self._call("POST", "/v1/charges", _drop_none(body)))

    # -- admin on entries ------------------------------------------------------------------

    async def void(self, billing_entry_id: str, reason: str) -> Entry:
        """Refund a charge (admin)."""
        return Entry.from_json(await self._call("POST", f"/v1/entries/{billing_entry_id}/void", {"reason": reason}))

    async def finalize(self, billing_entry_id: str) -> Entry:
        """Mark a charge as settled by hand (admin)."""
        return Entry.from_json(await self._call("POST", f"/v1/entries/{billing_entry_id}/finalize"))

    # -- accounts --------------------------------------------------------------------------

    async def balance(self, account_id: str) -> Balance:
        """An account's balances."""
        return Balance.from_json(await self._call("GET", f"/v1/accounts/{account_id}"))

    async def entries(
        self, account_id: str, *, states: Sequence[str] = (), cursor: str | None = None, limit: int = PAGE_LIMIT_DEFAULT
    ) -> Page[Entry]:
        """One page of an account's entries, oldest first, optionally only in ``states``."""
        params: list[tuple[str, str | int]] = [("limit", limit), *(("state", state) for state in states)]
        if cursor is not None:
            params.append(("cursor", cursor))
        body = await self._call("GET", f"/v1/accounts/{account_id}/entries", params=params)
        return Page(tuple(Entry.from_json(item) for item in body["items"]), body["next_cursor"])

    async def iter_entries(
        self, account_id: str, *, states: Sequence[str] = (), limit: int = PAGE_LIMIT_DEFAULT
    ) -> AsyncIterator[Entry]:
        """Every entry of an account, page by page."""
        cursor: str | None = None
        while True:
            page = await self.entries(account_id, states=states, cursor=cursor, limit=limit)
            for entry in page.items:
                yield entry
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def credit(
        self,
        account_id: str,
        credit_id: str,
        amount_micro: int,
        *,
        kind: str = "mint",
        reason: str | None = None,
        paid_micro_usdc: int | None = None,
    ) -> CreditResult:
        """Mint, deduct or credit-note an amount (admin), idempotent on ``credit_id``."""
        body = {
            "credit_id": credit_id,
            "kind": kind,
            "amount_micro": str(amount_micro),
            "reason": reason,
            "paid_micro_usdc": _wire_micro(paid_micro_usdc),
        }
        return CreditResult.from_json(await self._call("POST", f"/v1/accounts/{account_id}/credits", _drop_none(body)))

    # -- operations ------------------------------------------------------------------------

    async def dead_letters(self, *, after: str | None = None, limit: int = PAGE_LIMIT_DEFAULT) -> Page[DeadLetter]:
        """One page of the finalize queue's dead letters (admin)."""
        params = _drop_none({"after": after, "limit": limit})
        body = await self._call("GET", "/v1/settlement/poison", params=params)
        return Page(tuple(DeadLetter(**item) for item in body["items"]), body["next_after"])

    async def replay_dead_letters(self) -> ReplayReport:
        """Replay every dead letter against settlement (admin)."""
        return ReplayReport(**await self._call("POST", "/v1/settlement/poison/replay"))

    async def breaker(self) -> str:
        """The settlement breaker's state: CLOSED, OPEN or HALF_OPEN (admin)."""
        return str((await self._call("GET", "/v1/settlement/breaker"))["state"])

    async def reset_breaker(self) -> str:
        """Close the breaker (admin); returns its new state."""
        return str((await self._call("POST", "/v1/settlement/breaker/reset"))["state"])

    async def guard(self, *, shard: int | None = None) -> dict[str, Any]:
        """The conservation guard's status (admin).

        On a cluster node: every shard's guard under ``shards`` (``shard``: only that one's).
        """
        params = None if shard is None else {"shard": shard}
        result: dict[str, Any] = await self._call("GET", "/v1/guard", params=params)
        return result

    async def reset_guard(self, *, shard: int | None = None) -> dict[str, Any]:
        """Reset the guard and run its checks again (admin); returns its new status.

        On a cluster node: every shard's guard, by its owner (``shard``: only that one's).
        """
        params = None if shard is None else {"shard": shard}
        result: dict[str, Any] = await self._call("POST", "/v1/guard/reset", params=params)
        return result

    async def prices(self) -> dict[str, Price]:
        """The price table by model."""
        body = await self._call("GET", "/v1/prices")
        return {model: Price(**price) for model, price in body["models"].items()}

    async def ready(self) -> dict[str, Any]:
        """The readiness report (``ready`` is False while new holds are refused; no error is raised)."""
        _, content, _ = await self._send("GET", "/readyz", None, None)
        result: dict[str, Any] = json.loads(content)
        return result
