"""The settlement client: one finalize call in, one :class:`Attempt` value out.

A thin adapter over one reused ``aiohttp.ClientSession``. It signs a short-lived JWT for each call
(claims from :mod:`tollway.settlement.contract`), posts the body, and turns whatever happened
into an :class:`Attempt`: the HTTP status (``None`` when there was none) and the
:class:`~tollway.core.retry.Verdict` from :func:`~tollway.core.retry.classify_status`.
Timeouts and network errors are ``RETRY``; data that cannot be sent is ``POISON``. Settlement
failures are business outcomes, so :meth:`SettlementClient.finalize` never raises for them; it
raises only for programming errors (a bad URL or signing setup is refused at construction).

aiohttp rather than httpx: measured here against the simulator, httpx spent 0.7 ms of client
CPU per request alone and 2.4 ms at 32 concurrent requests (its pool scans grow with
concurrency), aiohttp 0.07–0.15 ms — the worker must finalize as fast as gateways commit.

The whole call — connect, send, wait, read — is bounded by ``timeout_ms`` (1000 ms by default,
SPEC §8), and at most :data:`MAX_REASON_BYTES` of a response body are read. The clock is
injected (``clock_ms``) and only used for ``iat``/``exp``. The client does not retry, does not
consult the breaker and keeps no state besides its connection pool: the worker decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit

import aiohttp
import msgspec

from tollway.core.errors import ConfigError, InvalidInput, TollwayError
from tollway.core.money import parse_micro
from tollway.core.retry import Verdict, classify_status
from tollway.settlement.contract import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    DEFAULT_TENANT_ID,
    FINALIZE_PATH,
    FINALIZED_PATH,
    PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX,
    SETTLEMENT_TIMEOUT_MS,
    TOKEN_LIFETIME_S,
    FinalizeRequest,
    audit_claims,
    check_request,
    finalize_body,
    finalize_claims,
)
from tollway.tokens import ALG_HS256, KeyMaterialError, SigningKey, check_hs256_secret, sign

MAX_REASON_BYTES: Final = 4096
"""Most of a response body read to explain a refusal."""
MAX_REASON_CHARS: Final = 200
"""Longest reason kept in an :class:`Attempt` (it ends up in logs and the poison stream)."""
MAX_CONNECTIONS: Final = 32
"""Connection pool size: above the worker's and the bulk replay's concurrency."""
MAX_LIST_RESPONSE_BYTES: Final = 8 << 20
"""Largest finalized-list page read (1000 items are ~250 KiB)."""
MAX_TIMEOUT_MS: Final = 60_000
"""Longest per-call timeout accepted (the contract's is 1000 ms)."""
MAX_TOKEN_LIFETIME_S: Final = 3600
"""Longest lifetime a finalize token may be given (the contract's is 300 s)."""
USER_AGENT: Final = "tollway-settlement-client"


class SettlementUnavailable(TollwayError):
    """Reading the finalized list failed (network, timeout, a non-200 or malformed answer)."""


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch, from the system clock."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one finalize call ended."""

    status: int | None  # the HTTP status; None after a timeout, a network error or unsendable data
    verdict: Verdict
    reason: str  # a few words for logs and the poison stream ("HTTP 503: outage", "timeout")


@dataclass(frozen=True, slots=True)
class SettlementAuth:
    """How finalize calls are signed: ES256 with ``signing_key``, or HS256 when explicitly allowed."""

    signing_key: SigningKey | None = None
    hs256_secret: bytes | None = field(default=None, repr=False)
    allow_hs256: bool = False
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    tenant_id: str = DEFAULT_TENANT_ID  # used for calls without a request (the finalized list)
    token_lifetime_s: int = TOKEN_LIFETIME_S

    def __post_init__(self) -> None:
        if self.signing_key is None and not (self.allow_hs256 and self.hs256_secret is not None):
            raise ConfigError("settlement calls need a signing key (or an HS256 secret with allow_hs256)")
        if self.signing_key is None and self.hs256_secret is not None:
            try:
                check_hs256_secret(self.hs256_secret)
            except KeyMaterialError as exc:
                raise ConfigError(str(exc)) from exc
        if not 1 <= self.token_lifetime_s <= MAX_TOKEN_LIFETIME_S:
            raise ConfigError(
                f"token_lifetime_s must be between 1 and {MAX_TOKEN_LIFETIME_S}, got {self.token_lifetime_s}"
            )

    def token(self, claims: dict[str, object]) -> str:
        """``claims`` signed: ES256 when there is a signing key, else HS256."""
        if self.signing_key is not None:
            return self.signing_key.sign(claims)
        assert self.hs256_secret is not None  # __post_init__
        return sign(claims, self.hs256_secret, None, ALG_HS256)


@dataclass(frozen=True, slots=True)
class FinalizedItem:
    """One reservation as settlement lists it."""

    reservation_id: str
    account_id: str
    actual_cost_micro: int
    trace_id: str
    finalized_at_ms: int
    calls: int


@dataclass(frozen=True, slots=True)
class FinalizedPage:
    """One page of settlement's finalized list."""

    items: tuple[FinalizedItem, ...]
    next_cursor: str | None  # None on the last page


class _WireItem(msgspec.Struct, frozen=True):
    reservation_id: str = msgspec.field(name="reservationId")
    account_id: str = msgspec.field(name="accountId")
    actual_cost_micro: str = msgspec.field(name="actualCostMicro")
    trace_id: str = msgspec.field(name="traceId")
    finalized_at_ms: int
    calls: int


class _WirePage(msgspec.Struct, frozen=True):
    items: list[_WireItem]
    next_cursor: str | None


class SettlementClient:
    """Finalize calls to one settlement service over one reused ``aiohttp.ClientSession``.

    Pass in a session you own (you close it), or use :meth:`from_url` and close this one
    (``await client.aclose()`` or ``async with``).
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        settlement_url: str,
        auth: SettlementAuth,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
        timeout_ms: int = SETTLEMENT_TIMEOUT_MS,
    ) -> None:
        self._base_url = check_settlement_url(settlement_url)
        _check_timeout(timeout_ms)
        self._http = http
        self._auth = auth
        self._clock_ms = clock_ms
        self._timeout_s = timeout_ms / 1000
        self._owns_http = False

    @classmethod
    def from_url(
        cls,
        settlement_url: str,
        auth: SettlementAuth,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
        timeout_ms: int = SETTLEMENT_TIMEOUT_MS,
    ) -> SettlementClient:
        """A client with its own connection pool (no proxies from the environment, no redirects)."""
        check_settlement_url(settlement_url)
        _check_timeout(timeout_ms)
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
            auto_decompress=False,
        )
        client = cls(http, settlement_url, auth, clock_ms=clock_ms, timeout_ms=timeout_ms)  # checked above
        client._owns_http = True
        return client

    async def aclose(self) -> None:
        """Close the connection pool if this client created it."""
        if self._owns_http:
            await self._http.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def finalize(self, request: FinalizeRequest) -> Attempt:
        """Finalize one charge; the outcome is a value, whatever settlement did."""
        try:
            check_request(request)
        except InvalidInput as exc:
            return Attempt(None, Verdict.POISON, _clip(f"invalid data: {exc}"))
        auth = self._auth
        claims = finalize_claims(
            request,
            issuer=auth.issuer,
            audience=auth.audience,
            now_ms=self._clock_ms(),
            lifetime_s=auth.token_lifetime_s,
        )
        headers = {
            "Authorization": f"Bearer {auth.token(claims)}",
            "Idempotency-Key": request.billing_entry_id,
            "Content-Type": "application/json",
        }
        content = msgspec.json.encode(finalize_body(request))
        try:
            async with asyncio.timeout(self._timeout_s):
                status, head, _ = await self._send("POST", FINALIZE_PATH, headers, content=content)
        except TimeoutError:
            return Attempt(None, Verdict.RETRY, "timeout")
        except aiohttp.ClientError as exc:
            return Attempt(None, Verdict.RETRY, _network_reason(exc))
        return Attempt(status, classify_status(status), _status_reason(status, head))

    async def list_finalized(self, cursor: str | None = None, limit: int = PAGE_LIMIT_DEFAULT) -> FinalizedPage:
        """One page of what settlement finalized; :class:`SettlementUnavailable` if it cannot be read."""
        if not 1 <= limit <= PAGE_LIMIT_MAX:
            raise InvalidInput(f"limit must be between 1 and {PAGE_LIMIT_MAX}", field="limit")
        auth = self._auth
        claims = audit_claims(
            issuer=auth.issuer, audience=auth.audience, tenant_id=auth.tenant_id, now_ms=self._clock_ms()
        )
        params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        headers = {"Authorization": f"Bearer {auth.token(claims)}"}
        try:
            async with asyncio.timeout(self._timeout_s):
                status, body, complete = await self._send(
                    "GET", FINALIZED_PATH, headers, params=params, limit_bytes=MAX_LIST_RESPONSE_BYTES
                )
        except TimeoutError as exc:
            raise SettlementUnavailable("settlement list: timeout") from exc
        except aiohttp.ClientError as exc:
            raise SettlementUnavailable(f"settlement list: {_network_reason(exc)}") from exc
        if status != 200 or not complete:
            raise SettlementUnavailable(f"settlement list: {_status_reason(status, body[:MAX_REASON_BYTES])}")
        return _parse_page(body)

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        *,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        limit_bytes: int = MAX_REASON_BYTES,
    ) -> tuple[int, bytes, bool]:
        """Status, up to ``limit_bytes`` of the body, and whether that was all of it."""
        url = self._base_url + path
        async with self._http.request(
            method, url, data=content, params=params, headers=headers, allow_redirects=False
        ) as response:
            body = bytearray()
            while len(body) <= limit_bytes:
                chunk = await response.content.read(limit_bytes + 1 - len(body))
                if not chunk:
                    return response.status, bytes(body), True
                body += chunk
            return response.status, bytes(body[:limit_bytes]), False


def check_settlement_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an absolute http(s) URL; else :class:`ConfigError`."""
    try:
        parsed = urlsplit(url)
        host = parsed.hostname
    except ValueError as exc:
        raise ConfigError(f"invalid settlement_url {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not host:
        raise ConfigError(f"settlement_url must be an absolute http(s) URL, got {url!r}")
    return url.rstrip("/")


def _check_timeout(timeout_ms: int) -> None:
    if not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise ConfigError(f"timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, got {timeout_ms}")


def _network_reason(exc: aiohttp.ClientError) -> str:
    kind = "connect error" if isinstance(exc, aiohttp.ClientConnectorError) else "network error"
    detail = str(exc) or type(exc).__name__
    return _clip(f"{kind}: {detail}")


def _status_reason(status: int, head: bytes) -> str:
    """``HTTP <status>: <status/error/message from the JSON body>``, or the start of a non-JSON body."""
    try:
        document = msgspec.json.decode(head)
    except msgspec.DecodeError:
        document = None
    if isinstance(document, dict):
        detail = ": ".join(str(document[key]) for key in ("status", "error", "message") if key in document)
    else:
        detail = head.decode("utf-8", "replace")
    return _clip(f"HTTP {status}: {detail}" if detail else f"HTTP {status}")


def _clip(text: str) -> str:
    printable = "".join(char if char.isprintable() else " " for char in text)
    return printable[:MAX_REASON_CHARS]


def _parse_page(body: bytes) -> FinalizedPage:
    try:
        page = msgspec.json.decode(body, type=_WirePage)
        items = tuple(
            FinalizedItem(
                item.reservation_id,
                item.account_id,
                parse_micro(item.actual_cost_micro, field="actualCostMicro"),
                item.trace_id,
                item.finalized_at_ms,
                item.calls,
            )
            for item in page.items
        )
    except (msgspec.ValidationError, msgspec.DecodeError, InvalidInput) as exc:
        raise SettlementUnavailable(f"settlement list: malformed page: {exc}") from exc
    return FinalizedPage(items, page.next_cursor)
