"""The hot path answers every billing request exactly as the router would (a differential test).

Two services on their own data directories and Redis shards, with the same fake clock, get the
same requests — one app with the hot path, one without. Their answers must be equal once entry
ids and times (which differ by construction) are masked.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from tests.api_fixtures import ADMIN, BASE_URL, GATEWAY, READ, Api, open_api
from tollway import Settings
from tollway.api import Authenticator, create_app, hot
from tollway.api.auth import development_key
from tollway.api.hot import HotPath
from tollway.service import Service
from tollway.testing import FakeClock

ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
TIMES = re.compile(r'"(\w+_ms|frozen_at_ms)":\s*\d+')


@contextlib.asynccontextmanager
async def app_pair(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Api, Api]]:
    """The same service twice: with and without the hot path."""
    async with contextlib.AsyncExitStack() as stack:
        apis = []
        for name, hot in (("hot", True), ("router", False)):
            settings = Settings(data_dir=tmp_path / name, redis_url=redis_url, shard=name)
            clock = FakeClock()
            service = await stack.enter_async_context(Service.running(settings, clock=clock, background=False))
            key, _ = development_key(settings)
            app = create_app(service, authenticator=Authenticator.from_settings(settings), hot_path=hot)
            transport = httpx.ASGITransport(app=app)
            http = await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url=BASE_URL))
            apis.append(Api(service, app, http, key, settings, clock))
        yield apis[0], apis[1]


def masked(response: httpx.Response) -> tuple[int, list[tuple[str, str]], str]:
    """Status, every header and the body, with entry ids and times masked."""
    body = TIMES.sub(r'"\1": 0', ULID.sub("<id>", response.text))
    headers = sorted((name, ULID.sub("<id>", value)) for name, value in response.headers.items())
    return response.status_code, headers, body


async def both(pair: tuple[Api, Api], method: str, path: str, **kw: Any) -> tuple[httpx.Response, httpx.Response]:
    """The same request to both apps; ``{id}`` in ``path`` is each app's own last entry id."""
    hot, router = pair
    answers = []
    for api in (hot, router):
        headers = kw.get("headers_for", lambda a: {})(api)
        real_path = path.replace("{id}", getattr(api, "last_id", "01ARZ3NDEKTSV4RRFFQ69G5FAV"))
        extra = {k: v for k, v in kw.items() if k != "headers_for"}
        answers.append(await api.http.request(method, real_path, headers=headers, **extra))
    assert masked(answers[0]) == masked(answers[1]), (method, path, answers[0].text, answers[1].text)
    return answers[0], answers[1]


def gateway(api: Api) -> dict[str, str]:
    return api.auth(GATEWAY)


async def test_hot_path_answers_like_the_router(tmp_path: Path, redis_url: str) -> None:
    """Successes, replays, refusals, auth failures and malformed bodies: the same status and body."""
    async with app_pair(tmp_path, redis_url) as pair:
        reserve = {"account_id": "acct", "request_id": "r1", "estimated_cost_micro": "5000"}
        await both(pair, "POST", "/v1/reservations", json=reserve)  # no token
        await both(pair, "POST", "/v1/reservations", json=reserve, headers_for=lambda a: {"authorization": "Bearer x"})
        await both(pair, "POST", "/v1/reservations", json=reserve, headers_for=lambda a: a.auth(READ))
        await both(
            pair, "POST", "/v1/reservations", json=reserve, headers_for=lambda a: a.auth(GATEWAY, accounts=["other"])
        )
        await both(pair, "POST", "/v1/reservations", json=reserve, headers_for=gateway)  # insufficient funds
        for api in pair:
            await api.mint("acct", 100_000)
        for body in (
            b"{",
            b"[]",
            b'{"account_id": "acct"}',
            b'{"account_id": "acct", "request_id": "r", "estimated_cost_micro": "x1"}',
        ):
            await both(
                pair,
                "POST",
                "/v1/reservations",
                content=body,
                headers_for=lambda a: {**gateway(a), "content-type": "application/json"},
            )
        await both(
            pair,
            "POST",
            "/v1/reservations",
            content=b"{}",
            headers_for=lambda a: {**gateway(a), "content-type": "text/plain"},
        )
        first = await both(pair, "POST", "/v1/reservations", json=reserve, headers_for=gateway)
        for api, answer in zip(pair, first, strict=True):
            api.last_id = answer.json()["billing_entry_id"]  # type: ignore[attr-defined]
        await both(pair, "POST", "/v1/reservations", json=reserve, headers_for=gateway)  # in progress
        await both(
            pair, "POST", "/v1/reservations", json={**reserve, "estimated_cost_micro": "6000"}, headers_for=gateway
        )
        await both(pair, "POST", "/v1/reservations/{id}/extend", json={"ttl_s": 60}, headers_for=gateway)
        await both(pair, "POST", "/v1/reservations/{id}/commit", json={"actual_cost_micro": "-1"}, headers_for=gateway)
        await both(
            pair,
            "POST",
            "/v1/reservations/{id}/commit",
            json={"actual_cost_micro": 4000, "response": {"t": 1}},
            headers_for=gateway,
        )
        await both(pair, "POST", "/v1/reservations/{id}/commit", json={"actual_cost_micro": 4000}, headers_for=gateway)
        await both(pair, "POST", "/v1/reservations/{id}/release", json={"reason": "user_cancel"}, headers_for=gateway)
        await both(pair, "POST", "/v1/reservations", json=reserve, headers_for=gateway)  # replay with response
        await both(
            pair, "POST", "/v1/reservations/not-an-id/commit", json={"actual_cost_micro": 1}, headers_for=gateway
        )
        await both(
            pair,
            "POST",
            "/v1/reservations/01ARZ3NDEKTSV4RRFFQ69G5FAV/release",
            json={"reason": "user_cancel"},
            headers_for=gateway,
        )
        charge = {"account_id": "acct", "request_id": "c1", "amount_micro": "700", "allow_partial": True}
        await both(pair, "POST", "/v1/charges", json=charge, headers_for=gateway)
        await both(pair, "POST", "/v1/charges", json=charge, headers_for=gateway)
        await both(pair, "POST", "/v1/charges", json={**charge, "amount_micro": "701"}, headers_for=gateway)
        await both(
            pair,
            "POST",
            "/v1/reservations",
            json={"account_id": "acct", "request_id": "m1", "model": "nope", "input_tokens": 1, "max_output_tokens": 1},
            headers_for=gateway,
        )
        await both(
            pair,
            "POST",
            "/v1/accounts/acct/credits",
            json={"credit_id": "x", "kind": "mint", "amount_micro": "1"},
            headers_for=lambda a: a.auth(ADMIN),
        )


async def test_bodies_without_a_usable_length_go_to_the_app(tmp_path: Path, redis_url: str) -> None:
    """A chunked body (no Content-Length) is the app's to count; the answer is the same either way."""
    async with app_pair(tmp_path, redis_url) as pair:
        for api in pair:
            await api.mint("acct", 100_000)

        async def chunked() -> AsyncIterator[bytes]:
            yield b'{"account_id": "acct", "request_id": "r1", '
            yield b'"estimated_cost_micro": "5000"}'

        for api in pair:
            response = await api.http.post(
                "/v1/reservations", content=chunked(), headers={**gateway(api), "content-type": "application/json"}
            )
            assert "content-length" not in response.request.headers
            assert 201 == response.status_code


@contextlib.asynccontextmanager
async def one_app(tmp_path: Path, redis_url: str) -> AsyncIterator[Api]:
    async with open_api(Settings(data_dir=tmp_path / "data", redis_url=redis_url), FakeClock()) as api:
        await api.mint("acct", 100_000)
        yield api


async def test_a_hot_request_never_enters_the_middleware_stack(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reserve and commit are answered in front of FastAPI; anything else still goes through it."""
    async with one_app(tmp_path, redis_url) as api:
        entered: list[str] = []
        full = api.app.full

        async def watched(scope: Scope, receive: Receive, send: Send) -> None:
            entered.append(scope["path"])
            await full(scope, receive, send)

        assert isinstance(api.app.front, HotPath)
        monkeypatch.setattr(api.app.front, "app", watched)
        reserved = await api.reserve("acct", "r1", 5_000)
        assert 201 == reserved.status_code
        entry = reserved.json()["billing_entry_id"]
        committed = await api.http.post(
            f"/v1/reservations/{entry}/commit", json={"actual_cost_micro": "4000"}, headers=api.auth(GATEWAY)
        )
        assert 200 == committed.status_code
        assert [] == entered
        assert 200 == (await api.http.get(f"/v1/reservations/{entry}", headers=api.auth(READ))).status_code
        assert [f"/v1/reservations/{entry}"] == entered


async def test_a_bug_after_the_engine_gets_the_500_body_and_is_raised(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception answering a hot request: the error table's 500, then raised on to the server."""
    async with one_app(tmp_path, redis_url) as api:

        def bug(*_: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(hot, "entry_outcome", bug)
        transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            body = {"account_id": "acct", "request_id": "r1", "estimated_cost_micro": "5000"}
            response = await http.post("/v1/reservations", json=body, headers=api.auth(GATEWAY))
        assert (500, "internal_error") == (response.status_code, response.json()["error"])
        with pytest.raises(RuntimeError, match="a bug"):
            await api.reserve("acct", "r2", 5_000)
        assert 10_000 == api.service.engine.balance("acct").held_micro  # both were executed: the bug came after
