"""HTTP API errors: every code of the table, 413 before parsing, and garbage never answered with a 5xx."""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tests.api_fixtures import ADMIN, BASE_URL, GATEWAY, READ, Api, api, check_error, open_api
from tollway import Settings
from tollway.api.errors import ERROR_STATUS
from tollway.api.schemas import (
    BalanceOut,
    CreditOut,
    EntryOut,
    EntryPageOut,
    ErrorOut,
    GuardOut,
    PoisonPageOut,
    PricesOut,
)
from tollway.core import commands as cmd
from tollway.core.errors import EngineStopped, ShardFenced
from tollway.redis.errors import RedisDown
from tollway.testing import FakeClock

__all__ = ["api"]

UNKNOWN_ID = "01JH0000000000000000000000"


async def _codes_of_a_settlement_mode_app(api: Api) -> list[tuple[int, str]]:
    """Provoke, on one app, every code that needs money, entries or settlement mode."""
    seen: list[httpx.Response] = []
    gw, admin = api.auth(GATEWAY), api.auth(ADMIN)
    seen.append(await api.http.post("/v1/reservations", json={}, headers=gw))  # invalid_request
    seen.append(await api.http.get("/v1/accounts/a"))  # unauthorized
    seen.append(await api.reserve("poor", "r", 10))  # insufficient_funds
    seen.append(await api.http.post("/v1/charges", json={}, headers=api.auth(READ)))  # forbidden
    seen.append(await api.http.get(f"/v1/reservations/{UNKNOWN_ID}", headers=gw))  # not_found
    seen.append(await api.http.get("/v1/charges", headers=gw))  # method_not_allowed
    await api.mint("rich", 1_000_000)
    first = await api.held("rich", "r1", 100)
    seen.append(await api.reserve("rich", "r1", 100))  # request_in_progress
    seen.append(await api.reserve("rich", "r1", 200))  # idempotency_key_reused
    seen.append(await api.http.post(f"/v1/entries/{first}/void", json={"reason": "x"}, headers=admin))  # transition
    seen.append(await api.http.post("/v1/charges", content=b"0" * (2 << 20), headers=gw))  # payload_too_large
    expiring = await api.held("rich", "r2", 100)
    await api.http.post(f"/v1/reservations/{first}/commit", json={"actual_cost_micro": 50}, headers=gw)
    seen.append(await api.reserve("rich", "r3", 1))  # pending_settlement_limit (risk cap 0)
    await api.service.engine.execute(cmd.FinalizeFail(first, "test", 5))
    seen.append(await api.reserve("poor", "r4", 1))  # billing_service_unavailable (cap 1)
    assert api.service.worker is not None
    api.service.worker.in_flight.add(first)  # a settlement call for it is under way
    seen.append(await api.http.post(f"/v1/entries/{first}/void", json={"reason": "x"}, headers=admin))  # in flight
    api.service.worker.in_flight.clear()
    api.clock.advance(3_600_000)
    seen.append(await api.http.post(f"/v1/reservations/{expiring}/release", json={"reason": "user_cancel"}, headers=gw))
    api.service.engine.set_holds_allowed(False)
    seen.append(await api.reserve("poor", "r5", 1))  # BILLING_EVALUATOR_UNAVAILABLE
    return [(response.status_code, response.json()["error"]) for response in seen]


async def _codes_of_a_failing_standalone_app(api: Api, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Standalone, then an engine that stopped, a Redis that is down and a bug."""
    admin = api.auth(ADMIN)
    seen = [await api.http.get("/v1/settlement/breaker", headers=admin)]  # settlement_not_configured

    async def down(*_: Any) -> None:
        raise RedisDown("down")  # what the queue's boundary turns redis-py's ConnectionError into

    monkeypatch.setattr(api.service.queue, "dead_letters", down)
    seen.append(await api.http.get("/v1/settlement/poison", headers=admin))  # redis_unavailable

    async def stopped(*_: Any) -> None:
        raise EngineStopped("stopped")

    monkeypatch.setattr(api.service.engine, "execute", stopped)
    seen.append(await api.reserve("a", "r", 1))  # service_unavailable

    async def fenced(*_: Any) -> None:
        raise ShardFenced("fenced", shard=0, epoch=1)

    monkeypatch.setattr(api.service.engine, "execute", fenced)
    seen.append(await api.reserve("a", "r", 1))  # shard_moved (cluster mode: the batch was refused by the fence)

    async def bug(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.service.engine, "execute", bug)
    transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        body = {"account_id": "a", "request_id": "r", "estimated_cost_micro": "1"}
        seen.append(await http.post("/v1/reservations", json=body, headers=api.auth(GATEWAY)))  # internal_error
    return [(response.status_code, response.json()["error"]) for response in seen]


async def test_every_code_of_the_error_table(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each code of the one table is answered somewhere, with the status the table gives it."""
    settlement = Settings(
        data_dir=tmp_path / "a",
        redis_url=redis_url,
        settlement_url="http://127.0.0.1:9",
        max_pending_reconciliation=1,
        max_pending_risk_cu=0,
    )
    async with open_api(settlement, FakeClock()) as first:
        seen = await _codes_of_a_settlement_mode_app(first)
    standalone = Settings(data_dir=tmp_path / "b", redis_url=redis_url, shard="b")
    async with open_api(standalone, FakeClock()) as second:
        seen += await _codes_of_a_failing_standalone_app(second, monkeypatch)
    assert sorted((status, code) for code, status in ERROR_STATUS.items()) == sorted(set(seen))


async def _call_asgi(api: Api, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, int]:
    """Send a POST straight to the ASGI app; returns (status, chunks the app asked for)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/charges",
        "raw_path": b"/v1/charges",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("test", 80),
        "client": ("127.0.0.1", 1),
        "headers": [(b"content-type", b"application/json"), *headers],
    }
    reads = 0
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        if reads > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[reads - 1], "more_body": reads < len(chunks)}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await api.app(scope, receive, send)
    return statuses[0], reads


@pytest.mark.parametrize("token", [False, True], ids=["anonymous", "gateway-token"])
async def test_oversized_bodies_get_413_before_they_are_parsed(api: Api, token: bool) -> None:
    """A declared length over 1 MiB is refused without reading a byte; an undeclared one stops at the limit.

    With a gateway token the request is one the hot path would take: it must leave both to the app.
    """
    chunk = b"[" * (512 << 10)
    auth = [(b"authorization", api.auth(GATEWAY)["authorization"].encode())] if token else []
    declared = [(b"content-length", str(4 << 20).encode()), *auth]
    assert (413, 0) == await _call_asgi(api, declared, [chunk] * 8)
    assert (413, 3) == await _call_asgi(api, auth, [chunk] * 8)


async def test_a_body_just_under_the_limit_is_parsed(api: Api) -> None:
    """Just under the limit, a (bad) body reaches the parser: 400, not 413."""
    body = json.dumps({"account_id": "a" * ((1 << 20) - 100)}).encode()
    response = await api.http.post(
        "/v1/charges", content=body, headers={**api.auth(GATEWAY), "content-type": "application/json"}
    )
    check_error(response, 400, "invalid_request")


# -- garbage ---------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "account_id", "request_id", "estimated_cost_micro", "model", "input_tokens", "max_output_tokens", "ttl_s",
    "correlation_id", "actual_cost_micro", "output_tokens", "response", "reason", "amount_micro", "allow_partial",
    "credit_id", "kind", "paid_micro_usdc",
]  # fmt: skip
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries({}, optional={field: JSON | st.sampled_from(["1", "0", "acct", "mint"]) for field in FIELDS}),
)
IDS = st.sampled_from([UNKNOWN_ID, "x", "%00", "..", "0" * 300]) | st.text(max_size=30)
POSTS = [
    "/v1/reservations",
    "/v1/reservations/{id}/commit",
    "/v1/reservations/{id}/release",
    "/v1/reservations/{id}/extend",
    "/v1/charges",
    "/v1/entries/{id}/void",
    "/v1/entries/{id}/finalize",
    "/v1/accounts/{id}/credits",
    "/v1/settlement/poison/replay",
    "/v1/settlement/breaker/reset",
    "/v1/guard/reset",
]
GETS = [
    "/v1/reservations/{id}",
    "/v1/accounts/{id}",
    "/v1/accounts/{id}/entries",
    "/v1/settlement/poison",
    "/v1/prices",
]


def _path(template: str, entry_id: str) -> str:
    return template.replace("{id}", urllib.parse.quote(entry_id, safe="") or "x")


DOCUMENTED: dict[str, type[BaseModel]] = {
    "/v1/reservations": EntryOut,
    "/v1/reservations/{id}": EntryOut,
    "/v1/charges": EntryOut,
    "/v1/accounts/{id}": BalanceOut,
    "/v1/accounts/{id}/entries": EntryPageOut,
    "/v1/accounts/{id}/credits": CreditOut,
    "/v1/settlement/poison": PoisonPageOut,
    "/v1/guard/reset": GuardOut,
    "/v1/prices": PricesOut,
}


def _assert_answered(template: str, response: httpx.Response) -> None:
    """Never a 5xx; an error has the stable body; a success matches the model /openapi.json documents."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        ErrorOut.model_validate(response.json())
        return
    model = DOCUMENTED.get(
        template, EntryOut if "/v1/reservations/" in template or "/v1/entries/" in template else None
    )
    assert model is not None, template
    model.model_validate(response.json())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(POSTS), entry_id=IDS, body=BODIES, raw=st.none() | st.binary(max_size=64))
async def test_garbage_posts_never_get_a_5xx(
    api: Api, template: str, entry_id: str, body: Any, raw: bytes | None
) -> None:
    """Random JSON (or bytes) to every POST endpoint, as admin: a documented 2xx or a 4xx with the error body."""
    headers = {**api.auth(ADMIN), "content-type": "application/json"}
    with contextlib.suppress(ValueError):  # NaN and infinities do not encode as strict JSON: send them anyway
        content = raw if raw is not None else json.dumps(body).encode()
        _assert_answered(template, await api.http.post(_path(template, entry_id), content=content, headers=headers))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    template=st.sampled_from(GETS),
    entry_id=IDS,
    params=st.dictionaries(st.sampled_from(["state", "cursor", "limit", "after"]), st.text(max_size=20), max_size=3),
)
async def test_garbage_queries_never_get_a_5xx(api: Api, template: str, entry_id: str, params: dict[str, str]) -> None:
    """Random ids and query parameters on every GET endpoint: never a 5xx."""
    _assert_answered(template, await api.http.get(_path(template, entry_id), params=params, headers=api.auth(ADMIN)))
