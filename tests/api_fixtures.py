"""Fixtures for the HTTP API tests: a real service on ``tmp_path`` behind the app, called in-process.

:func:`open_api` starts a :class:`~tollway.service.Service` (real engine with fsync, the test's
embedded Redis, no background tasks — tests drive the projector and sweeper themselves; its
guard and metrics) and the app, and yields an :class:`Api` with an
``httpx.AsyncClient`` on ``httpx.ASGITransport`` and helpers to sign tokens. The ``api``
fixture is the standalone-mode default; tests that need other settings call :func:`open_api`.

Every JSON answer can be checked against the pydantic models that document it in
``/openapi.json`` (:func:`check_entry`, :func:`check_error`).

Import the fixtures into a test module::

    from tests.api_fixtures import api  # noqa: F401
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tollway import Settings
from tollway.api import Authenticator, create_app
from tollway.api.app import TollwayAPI
from tollway.api.auth import development_key, token_claims
from tollway.api.schemas import EntryOut, ErrorOut
from tollway.service import Service
from tollway.testing import FakeClock
from tollway.tokens import SigningKey

BASE_URL = "http://tollway.test"
ADMIN = "billing:admin"
GATEWAY = "billing:gateway"
READ = "billing:read"


@dataclass
class Api:
    """A running service, its app, a client without credentials, and the signing key."""

    service: Service
    app: TollwayAPI
    http: httpx.AsyncClient
    key: SigningKey
    settings: Settings
    clock: FakeClock

    def token(
        self,
        *scopes: str,
        accounts: Sequence[str] | None = None,
        subject: str = "tester",
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A token of this service signed with its development key; ``claims`` override (None: drop)."""
        now_s = int(time.time())
        body = token_claims(
            list(scopes),
            subject=subject,
            audience=self.settings.auth_audience,
            issuer=self.settings.auth_issuer,
            now_s=now_s,
            ttl_s=600,
            accounts=accounts,
        )
        body.update(claims or {})
        return self.key.sign({name: value for name, value in body.items() if value is not None})

    def auth(self, *scopes: str, accounts: Sequence[str] | None = None) -> dict[str, str]:
        """The Authorization header of a fresh token."""
        return {"authorization": f"Bearer {self.token(*scopes, accounts=accounts)}"}

    async def mint(self, account_id: str, amount_micro: int, credit_id: str = "mint-1") -> None:
        """Fund ``account_id`` through the API."""
        body = {"credit_id": credit_id, "kind": "mint", "amount_micro": str(amount_micro)}
        response = await self.http.post(f"/v1/accounts/{account_id}/credits", json=body, headers=self.auth(ADMIN))
        assert 201 == response.status_code, response.text

    async def reserve(self, account_id: str, request_id: str, amount_micro: int, **extra: Any) -> httpx.Response:
        """POST /v1/reservations by amount with a gateway token."""
        body = {"account_id": account_id, "request_id": request_id, "estimated_cost_micro": str(amount_micro), **extra}
        return await self.http.post("/v1/reservations", json=body, headers=self.auth(GATEWAY))

    async def held(self, account_id: str, request_id: str, amount_micro: int) -> str:
        """A new hold's entry id (asserts 201)."""
        response = await self.reserve(account_id, request_id, amount_micro)
        assert 201 == response.status_code, response.text
        return str(response.json()["billing_entry_id"])


@contextlib.asynccontextmanager
async def open_api(settings: Settings, clock: FakeClock) -> AsyncIterator[Api]:
    """A service over ``settings`` (its guard ready) and its app; everything closed on exit."""
    async with Service.running(settings, clock=clock, background=False) as service:
        key, _ = development_key(settings)
        app = create_app(service, authenticator=Authenticator.from_settings(settings))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http:
            yield Api(service, app, http, key, settings, clock)


@pytest.fixture
async def api(tmp_path: Any, redis_url: str) -> AsyncIterator[Api]:
    """Standalone mode (no settlement), the test's embedded Redis, a fake engine clock."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url)
    async with open_api(settings, FakeClock()) as running:
        yield running


def check_entry(body: Any) -> dict[str, Any]:
    """``body`` is an entry exactly as ``EntryOut`` documents it."""
    EntryOut.model_validate(body, strict=False)
    assert set(EntryOut.model_fields) == set(body)
    result: dict[str, Any] = body
    return result


def check_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``response`` is the stable error body with ``status`` and ``code``."""
    body = response.json()
    ErrorOut.model_validate(body)
    assert (status, code) == (response.status_code, body["error"]), response.text
    result: dict[str, Any] = body
    return result
