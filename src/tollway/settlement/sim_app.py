"""The settlement simulator as an ASGI app: the contract's gates, the book, the admin endpoints.

Each finalize call goes through the same gates in the same order; the first that refuses answers:

1. **faults** — the body is read (bounded, 413 beyond), then ``latency_ms`` is slept; then
   ``outage`` (503), ``status_override`` (that status), ``error_rate`` (500 or 503, from a
   generator seeded with ``config.seed``). A caller that times out during the latency still
   has its call processed — as with a slow real service — so its retry meets a 409;
2. **token** — bearer JWT verified by :func:`tollway.tokens.verify` against the configured
   keys (HS256 only with ``allow_hs256``) → 401;
3. **body** — a JSON object of string fields with a canonical ``actualCostMicro`` → else 400;
   well-formed but meaningless values (a ``reservationId`` that is not a ULID) → 422;
4. **binding** — the token's ``purpose``, ``reservation_id`` and ``sub`` match the body → else
   403; the ``Idempotency-Key`` header is present (400) and equals ``reservationId`` (422);
5. **book** — :func:`tollway.settlement.store.decide`: 200 the first time, 409 afterwards.

Faults apply to every ``/api/internal/*`` request (the list too: an outage is an outage) and
never to ``/admin/*``. The admin endpoints need the ``X-Admin-Token`` header when an
``admin_token`` is configured and are otherwise open to loopback clients only.

State lives in memory; with ``state_path`` the book is also written to a JSON file (atomically,
before a new finalization or a conflict is answered) and read back at startup, so a restarted
simulator still answers 409.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import os
import random
from pathlib import Path
from typing import Any, Final

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from tollway.core.errors import ConfigError, InvalidInput
from tollway.settlement.contract import (
    FINALIZE_PATH,
    FINALIZED_PATH,
    PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX,
    FinalizeRequest,
    Problem,
    check_binding,
    parse_finalize_body,
)
from tollway.settlement.sim_config import SimulatorConfig, fault_status, update_faults
from tollway.settlement.store import FinalizedBook, Outcome, to_item
from tollway.tokens import (
    KeyMaterialError,
    TokenInvalid,
    VerificationKey,
    keys_by_kid,
    load_verification_keys,
    verify,
)

ADMIN_TOKEN_HEADER: Final = "X-Admin-Token"  # noqa: S105  (a header name, not a secret)
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})
MAX_ADMIN_BODY_BYTES: Final = 4096
CLIENT_CLOSED_REQUEST: Final = 499  # counted in the stats only: nobody is left to read it


class SimulatorState:
    """The running simulator: its book, current faults and call counters."""

    def __init__(self, config: SimulatorConfig, keys: dict[str, VerificationKey], book: FinalizedBook) -> None:
        self.config = config
        self.keys = keys
        self.book = book
        self.faults = config.faults
        self.finalize_calls: collections.Counter[int] = collections.Counter()  # by response status
        self.list_calls: collections.Counter[int] = collections.Counter()
        self._rng = random.Random(config.seed)
        self._save_lock = asyncio.Lock()
        self._saves_wanted = 0
        self._saves_done = 0

    async def fault(self) -> Response | None:
        """Sleep the injected latency, then the injected failure for this request, if any."""
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        status = fault_status(self.faults, self._rng.random())
        if status is None:
            return None
        error = "outage" if self.faults.outage else "injected_fault"
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": error, "message": f"simulated {error}"}, status_code=status, headers=headers)

    def authenticate(self, request: Request) -> dict[str, Any] | Problem:
        """The verified claims of the request's bearer token, or a 401 problem."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Problem(401, "unauthorized", "a bearer token is required")
        config = self.config
        try:
            return verify(
                token.strip(),
                self.keys,
                config.audience,
                config.allow_hs256,
                config.hs256_secret,
                issuer=config.issuer,
                now_s=config.clock_ms() // 1000,
                leeway_s=config.leeway_s,
            )
        except TokenInvalid as exc:
            return Problem(401, "unauthorized", exc.reason)

    async def save(self) -> None:
        """Write the book to ``state_path``; concurrent callers share one write of the latest book."""
        path = self.config.state_path
        if path is None:
            return
        self._saves_wanted += 1
        wanted = self._saves_wanted
        async with self._save_lock:
            if self._saves_done >= wanted:
                return  # a write that started after this call's change already covered it
            covered, data = self._saves_wanted, self.book.to_json()
            await asyncio.to_thread(_write_atomically, path, data)
            self._saves_done = covered

    def stats(self) -> dict[str, Any]:
        """Counters for ``/admin/stats``."""
        return {
            "finalize_calls": {str(status): n for status, n in sorted(self.finalize_calls.items())},
            "list_calls": {str(status): n for status, n in sorted(self.list_calls.items())},
            "finalized": len(self.book),
            "conflicts": self.book.conflicts_total(),
            "faults": self.faults.to_json(),
        }


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


def _load_book(config: SimulatorConfig) -> FinalizedBook:
    path = config.state_path
    if path is None or not path.exists():
        return FinalizedBook(config.records_max)
    try:
        return FinalizedBook.from_json(path.read_bytes(), config.records_max)
    except (OSError, InvalidInput) as exc:
        raise ConfigError(f"cannot load the settlement book {path}: {exc}") from exc


def create_simulator_app(config: SimulatorConfig) -> FastAPI:
    """The simulator as an ASGI app; key files and the book file are read here, once."""
    try:
        loaded = load_verification_keys(config.key_files)
        keys = keys_by_kid([*config.keys.values(), *loaded.values()])
    except KeyMaterialError as exc:
        raise ConfigError(str(exc)) from exc
    state = SimulatorState(config, keys, _load_book(config))
    app = FastAPI(title="tollway settlement simulator", docs_url=None, redoc_url=None)
    app.state.simulator = state
    app.add_api_route(FINALIZE_PATH, _finalize, methods=["POST"], summary="Finalize one reservation")
    app.add_api_route(FINALIZED_PATH, _finalized, methods=["GET"], summary="List finalized reservations")
    app.add_api_route("/admin/faults", _get_faults, methods=["GET"], summary="Current injected faults")
    app.add_api_route("/admin/faults", _set_faults, methods=["POST"], summary="Change injected faults")
    app.add_api_route("/admin/stats", _stats, methods=["GET"], summary="Calls by status, finalized count")
    return app


def _state(request: Request) -> SimulatorState:
    state: SimulatorState = request.app.state.simulator
    return state


def _problem(problem: Problem) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if problem.status == 401 else None
    return JSONResponse(problem.body(), status_code=problem.status, headers=headers)


async def _read_body(request: Request, limit_bytes: int) -> bytes | Problem:
    too_large = Problem(413, "payload_too_large", f"the body is larger than {limit_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit_bytes:
        return too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit_bytes:
                return too_large
    except ClientDisconnect:
        return Problem(CLIENT_CLOSED_REQUEST, "client_closed_request", "the client went away mid-body")
    return bytes(body)


async def _finalize(request: Request) -> Response:
    state = _state(request)
    response = await _finalize_response(state, request)
    state.finalize_calls[response.status_code] += 1
    return response


async def _finalize_response(state: SimulatorState, request: Request) -> Response:
    # The body is read before the injected latency, as a slow real service would have it: a
    # caller that gives up still has its call land, and its retry meets a 409.
    raw = await _read_body(request, state.config.body_bytes_max)
    faulted = await state.fault()
    if faulted is not None:
        return faulted
    bound = _judge(state, request, raw)
    if isinstance(bound, Problem):
        return _problem(bound)
    outcome, record = state.book.finalize(bound, state.config.clock_ms())
    if record is None:  # Outcome.FULL
        return _problem(Problem(507, "book_full", f"the simulator holds {state.book.records_max} reservations"))
    if outcome in (Outcome.FINALIZED, Outcome.CONFLICT):
        await state.save()
    body = {"status": outcome.value, **to_item(record)}
    return JSONResponse(body, status_code=200 if outcome is Outcome.FINALIZED else 409)


def _judge(state: SimulatorState, request: Request, raw: bytes | Problem) -> FinalizeRequest | Problem:
    """Gates 2-4: the token, the body, the token-to-body binding and the Idempotency-Key."""
    claims = state.authenticate(request)
    if isinstance(claims, Problem):
        return claims
    parsed = parse_finalize_body(raw) if isinstance(raw, bytes) else raw
    bound = parsed if isinstance(parsed, Problem) else check_binding(claims, parsed)
    if isinstance(bound, Problem):
        return bound
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is None:
        return Problem(400, "invalid_request", "the Idempotency-Key header is required")
    if idempotency_key != bound.billing_entry_id:
        return Problem(422, "invalid_field", "Idempotency-Key must equal reservationId")
    return bound


async def _finalized(request: Request) -> Response:
    state = _state(request)
    response = await _finalized_response(state, request)
    state.list_calls[response.status_code] += 1
    return response


async def _finalized_response(state: SimulatorState, request: Request) -> Response:
    faulted = await state.fault()
    if faulted is not None:
        return faulted
    claims = state.authenticate(request)
    if isinstance(claims, Problem):
        return _problem(claims)
    try:
        limit = _parse_limit(request.query_params.get("limit"))
        records, next_cursor = state.book.page(request.query_params.get("cursor"), limit)
    except InvalidInput as exc:
        return _problem(Problem(400, "invalid_request", str(exc)))
    return JSONResponse({"items": [to_item(record) for record in records], "next_cursor": next_cursor})


def _parse_limit(raw: str | None) -> int:
    if raw is None:
        return PAGE_LIMIT_DEFAULT
    if not raw.isdecimal() or not 1 <= int(raw) <= PAGE_LIMIT_MAX:
        raise InvalidInput(f"limit must be an integer between 1 and {PAGE_LIMIT_MAX}", field="limit")
    return int(raw)


def _admin_refusal(state: SimulatorState, request: Request) -> Response | None:
    """None when the caller may use the admin endpoints; else the 401/403 answer."""
    expected = state.config.admin_token
    if expected is not None:
        given = request.headers.get(ADMIN_TOKEN_HEADER, "")
        if hmac.compare_digest(given.encode(), expected.encode()):
            return None
        return _problem(Problem(401, "unauthorized", f"the {ADMIN_TOKEN_HEADER} header is missing or wrong"))
    if request.client is not None and request.client.host in LOOPBACK_HOSTS:
        return None
    return _problem(Problem(403, "forbidden", "admin endpoints are open to loopback clients only"))


async def _get_faults(request: Request) -> Response:
    state = _state(request)
    return _admin_refusal(state, request) or JSONResponse(state.faults.to_json())


async def _set_faults(request: Request) -> Response:
    state = _state(request)
    refusal = _admin_refusal(state, request)
    if refusal is not None:
        return refusal
    changes = await _read_json_object(request, MAX_ADMIN_BODY_BYTES)
    if isinstance(changes, Problem):
        return _problem(changes)
    try:
        state.faults = update_faults(state.faults, changes)
    except InvalidInput as exc:
        return _problem(Problem(400, "invalid_request", str(exc)))
    return JSONResponse(state.faults.to_json())


async def _read_json_object(request: Request, limit_bytes: int) -> dict[str, Any] | Problem:
    raw = await _read_body(request, limit_bytes)
    if isinstance(raw, Problem):
        return raw
    try:
        document = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return Problem(400, "invalid_request", "the body is not valid JSON")
    if not isinstance(document, dict):
        return Problem(400, "invalid_request", "the body must be a JSON object")
    return document


async def _stats(request: Request) -> Response:
    state = _state(request)
    return _admin_refusal(state, request) or JSONResponse(state.stats())
