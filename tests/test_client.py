"""The SDK (tollway.client.AsyncClient): typed results and typed errors.

Each test runs twice: through httpx straight into the app in-process (``transport``), and through
the SDK's own path (aiohttp) to the same app served by uvicorn on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from tests.api_fixtures import ADMIN, BASE_URL, GATEWAY, READ, Api, api
from tollway import client as sdk
from tollway.client import AsyncClient

__all__ = ["api"]


@pytest.fixture(params=["asgi", "loopback"])
async def base_url(request: pytest.FixtureRequest, api: Api) -> AsyncIterator[str | None]:
    """None: httpx into the app in-process; else the URL of the app served by uvicorn on loopback."""
    if request.param == "asgi":
        yield None
        return
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api.app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:  # the socket listens already: a connection made before uvicorn accepts waits in its backlog
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        listener.close()


def _client(api: Api, base_url: str | None, *scopes: str, accounts: list[str] | None = None) -> AsyncClient:
    token = api.token(*scopes, accounts=accounts) if scopes else None
    if base_url is None:
        return AsyncClient(BASE_URL, token, transport=httpx.ASGITransport(app=api.app))
    return AsyncClient(base_url, token)


@pytest.fixture
async def admin(api: Api, base_url: str | None) -> AsyncIterator[AsyncClient]:
    """An SDK client with an admin token."""
    async with _client(api, base_url, ADMIN) as client:
        yield client


async def test_the_billing_loop_with_typed_results(api: Api, admin: AsyncClient) -> None:
    """Mint, reserve, commit with a response, repeat the reserve: ints for money, the stored response back."""
    minted = await admin.credit("acct-1", "m1", 1_000_000)
    assert isinstance(minted, sdk.CreditResult)
    assert (1_000_000, False) == (minted.balance.available_micro, minted.replayed)
    hold = await admin.reserve("acct-1", "req-1", estimated_cost_micro=20_000, ttl_s=30)
    assert ("RESERVE_HELD", 20_000, None) == (hold.state, hold.estimated_cost_micro, hold.actual_cost_micro)
    done = await admin.commit(hold.billing_entry_id, actual_cost_micro=12_345, response={"text": "hi"})
    assert ("COMMITTED", 12_345, 12_345) == (done.state, done.charged_micro, done.actual_cost_micro)
    repeat = await admin.reserve("acct-1", "req-1", estimated_cost_micro=20_000, ttl_s=30)
    assert (True, {"text": "hi"}) == (repeat.replayed, repeat.response)
    balance = await admin.balance("acct-1")
    assert (1_000_000 - 12_345, 0, 12_345) == (balance.available_micro, balance.held_micro, balance.charged_micro)
    assert done == await admin.get_entry(hold.billing_entry_id)


async def test_release_extend_charge_void_and_history(api: Api, admin: AsyncClient) -> None:
    """Every entry operation returns an Entry; iter_entries walks all pages."""
    await admin.credit("acct-1", "m1", 100_000)
    ids = [(await admin.reserve("acct-1", f"r{i}", estimated_cost_micro=10)).billing_entry_id for i in range(3)]
    assert api.clock.now + 600_000 == (await admin.extend(ids[0], 600)).expires_at_ms
    assert "RELEASED" == (await admin.release(ids[1], "user_cancel")).state
    fee = await admin.charge("acct-1", "fee", 500)
    assert "VOIDED" == (await admin.void(fee.billing_entry_id, "mistake")).state
    walked = [entry.billing_entry_id async for entry in admin.iter_entries("acct-1", limit=2)]
    assert [*ids, fee.billing_entry_id] == walked
    page = await admin.entries("acct-1", states=["RELEASED"])
    assert ((ids[1],), None) == (tuple(e.billing_entry_id for e in page.items), page.next_cursor)
    assert 0 < (await admin.prices())["gpt-4o"].output_micro_per_mtok
    assert (True, "ready") == ((await admin.ready())["ready"], (await admin.guard())["state"])
    assert "ready" == (await admin.reset_guard())["state"]
    assert () == (await admin.dead_letters()).items


async def test_overrun_and_account_existence_are_typed(admin: AsyncClient) -> None:
    """A commit above its hold carries an Overrun; a balance says whether the account exists."""
    await admin.credit("acct-1", "m1", 10_000)
    hold = await admin.reserve("acct-1", "r", estimated_cost_micro=1_000)
    done = await admin.commit(hold.billing_entry_id, actual_cost_micro=1_500)
    assert (sdk.Overrun(500, 500, 0), None) == (done.overrun, hold.overrun)
    assert (True, False) == ((await admin.balance("acct-1")).exists, (await admin.balance("acct-2")).exists)


async def test_typed_errors(api: Api, admin: AsyncClient) -> None:
    """Each common code raises its own ApiError subclass with status, code and details."""
    await admin.credit("acct-1", "m1", 1_000)
    with pytest.raises(sdk.InsufficientFunds) as poor:
        await admin.reserve("acct-1", "big", estimated_cost_micro=5_000)
    assert (402, "insufficient_funds", 4_000) == (poor.value.status, poor.value.code, poor.value.deficit_micro)
    hold = await admin.reserve("acct-1", "r", estimated_cost_micro=100)
    with pytest.raises(sdk.RequestInProgress):
        await admin.reserve("acct-1", "r", estimated_cost_micro=100)
    with pytest.raises(sdk.IdempotencyKeyReused):
        await admin.reserve("acct-1", "r", estimated_cost_micro=200)
    await admin.release(hold.billing_entry_id)
    with pytest.raises(sdk.InvalidTransition) as wrong:
        await admin.commit(hold.billing_entry_id, actual_cost_micro=1)
    assert "RELEASED" == wrong.value.current_state
    expiring = await admin.reserve("acct-1", "r2", estimated_cost_micro=100)
    api.clock.advance(301_000)
    with pytest.raises(sdk.ReservationExpired):
        await admin.commit(expiring.billing_entry_id, actual_cost_micro=1)
    with pytest.raises(sdk.NotFound):
        await admin.get_entry("01JH0000000000000000000000")
    with pytest.raises(sdk.InvalidRequest) as invalid:
        await admin.reserve("acct 1", "r3", estimated_cost_micro=1)
    assert "account_id" == invalid.value.details["field_errors"][0]["field"]
    with pytest.raises(sdk.Conflict):
        await admin.replay_dead_letters()
    with pytest.raises(sdk.Conflict):
        await admin.breaker()


async def test_auth_and_availability_errors(api: Api, base_url: str | None) -> None:
    """No token → Unauthorized; other accounts → Forbidden; guard closed → ServiceUnavailable with retry_after_s."""
    async with _client(api, base_url) as anonymous:
        with pytest.raises(sdk.Unauthorized):
            await anonymous.balance("acct-1")
    async with _client(api, base_url, READ, accounts=["other"]) as reader:
        with pytest.raises(sdk.Forbidden):
            await reader.balance("acct-1")
    api.service.engine.set_holds_allowed(False)
    async with _client(api, base_url, GATEWAY) as gateway:
        with pytest.raises(sdk.ServiceUnavailable) as busy:
            await gateway.reserve("acct-1", "r", estimated_cost_micro=1)
    assert (503, "BILLING_EVALUATOR_UNAVAILABLE", 30) == (busy.value.status, busy.value.code, busy.value.retry_after_s)


async def test_transport_failures_are_typed() -> None:
    """A connection that fails raises TransportFailure, a ClientError."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with AsyncClient(BASE_URL, "t", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(sdk.TransportFailure):
            await client.balance("acct-1")
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there any more
    async with AsyncClient(url, "t") as client:
        with pytest.raises(sdk.TransportFailure, match=f"GET {url}/v1/accounts/acct-1: ClientConnectorError"):
            await client.balance("acct-1")


async def test_a_non_json_error_body_still_gives_a_typed_error() -> None:
    """A proxy's HTML 503 becomes ServiceUnavailable with the default retry delay."""

    def proxy(_: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="<html>bad gateway</html>")

    async with AsyncClient(BASE_URL, "t", transport=httpx.MockTransport(proxy)) as client:
        with pytest.raises(sdk.ServiceUnavailable) as error:
            await client.balance("acct-1")
    assert ("http_503", 30) == (error.value.code, error.value.retry_after_s)
