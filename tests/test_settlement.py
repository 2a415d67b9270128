"""Settlement over real HTTP: the client against the simulator served by uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import jwt
import pytest
from aiohttp import web

from tollway.core.errors import ConfigError
from tollway.core.ids import encode_ulid
from tollway.core.retry import Verdict, classify_status
from tollway.settlement import (
    FINALIZE_PATH,
    FINALIZED_PATH,
    Attempt,
    FinalizedItem,
    FinalizeRequest,
    SettlementAuth,
    SettlementClient,
)
from tollway.settlement.contract import audit_claims, finalize_body, finalize_claims
from tollway.settlement.simulator import (
    Faults,
    SimulatorConfig,
    SimulatorServer,
    create_simulator_app,
    fault_status,
    serve_simulator,
)
from tollway.testing import FakeClock
from tollway.tokens import ALG_HS256, SigningKey, generate_signing_key, sign, verify

SECRET = b"k" * 32
ADMIN = "admin-secret"
ACK, RETRY, POISON = Verdict.ACK, Verdict.RETRY, Verdict.POISON


def ulid(n: int) -> str:
    return encode_ulid((1_767_225_600_000 << 80) | n)


def charge(n: int = 1, amount: int = 1234, account: str = "acct-1") -> FinalizeRequest:
    return FinalizeRequest(ulid(n), account, amount, f"trace-{n}", "tenant-a")


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The signing key the simulator trusts."""
    return generate_signing_key()


@pytest.fixture
def sim_config(key: SigningKey, clock: FakeClock) -> SimulatorConfig:
    """A simulator trusting ``key``, on the test's clock, with an admin token."""
    return SimulatorConfig(keys={key.kid: key.public()}, clock_ms=clock, admin_token=ADMIN)


@pytest.fixture
async def server(sim_config: SimulatorConfig) -> AsyncIterator[SimulatorServer]:
    """The simulator, served on a free loopback port for the test."""
    async with SimulatorServer(sim_config) as running:
        yield running


@pytest.fixture
async def client(server: SimulatorServer, key: SigningKey, clock: FakeClock) -> AsyncIterator[SettlementClient]:
    """A settlement client signing with ``key``."""
    async with SettlementClient.from_url(server.url, SettlementAuth(signing_key=key), clock_ms=clock) as made:
        yield made


@pytest.fixture
async def http(server: SimulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client on the simulator, for admin calls and hand-made requests."""
    async with httpx.AsyncClient(base_url=server.url, headers={"X-Admin-Token": ADMIN}, trust_env=False) as made:
        yield made


def make_client(
    server: SimulatorServer, auth: SettlementAuth, clock: Callable[[], int], timeout_ms: int = 1000
) -> SettlementClient:
    return SettlementClient.from_url(server.url, auth, clock_ms=clock, timeout_ms=timeout_ms)


async def finalize_once(server: SimulatorServer, auth: SettlementAuth, clock: Callable[[], int]) -> Attempt:
    async with make_client(server, auth, clock) as made:
        return await made.finalize(charge())


def outcome(attempt: Attempt) -> tuple[int | None, Verdict]:
    return attempt.status, attempt.verdict


def token_for(key: SigningKey, request: FinalizeRequest, clock: FakeClock) -> str:
    return key.sign(finalize_claims(request, issuer="tollway", audience="arrakis", now_ms=clock()))


async def post_raw(
    http: httpx.AsyncClient, body: bytes, token: str | None, idempotency_key: str | None = ulid(1)
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return await http.post(FINALIZE_PATH, content=body, headers=headers)


# -- the contract, exactly ---------------------------------------------------------------------


async def test_client_sends_the_exact_contract(key: SigningKey, clock: FakeClock) -> None:
    """Path, body, headers and every JWT claim are as SPEC §8 says."""
    seen: list[tuple[str, str, bytes, dict[str, str]]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, await request.read(), dict(request.headers)))
        return web.json_response({"status": "finalized"})

    app = web.Application()
    app.router.add_post("/api/internal/finalize", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        url = f"http://127.0.0.1:{port}/"
        async with SettlementClient.from_url(url, SettlementAuth(signing_key=key), clock_ms=clock) as client:
            assert (200, ACK) == outcome(await client.finalize(charge(7, 5_000_000)))
    finally:
        await runner.cleanup()
    method, path, content, headers = seen[0]
    body = {"reservationId": ulid(7), "accountId": "acct-1", "actualCostMicro": "5000000", "traceId": "trace-7"}
    assert ("POST", "/api/internal/finalize") == (method, path)
    assert body == json.loads(content)
    assert ulid(7) == headers["Idempotency-Key"]
    token = headers["Authorization"].removeprefix("Bearer ")
    assert {"alg": "ES256", "kid": key.kid, "typ": "JWT"} == jwt.get_unverified_header(token)
    iat = clock() // 1000
    expected = {
        "iss": "tollway",
        "aud": "arrakis",
        "sub": "acct-1",
        "tenant_id": "tenant-a",
        "purpose": "billing_finalize",
        "reservation_id": ulid(7),
        "trace_id": "trace-7",
        "iat": iat,
        "exp": iat + 300,
    }
    assert expected == verify(token, {key.kid: key.public()}, "arrakis", now_s=iat)


def test_body_amount_is_a_decimal_string() -> None:
    """Money goes on the wire as a canonical decimal string, never a number."""
    assert "9223372036854775807" == finalize_body(charge(amount=2**63 - 1))["actualCostMicro"]


# -- finalize: ack, repeat, conflict, list -------------------------------------------------------


async def test_finalize_then_repeat_is_listed_once(
    client: SettlementClient, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """First call 200, repeat 409 (both ACK); the list holds it once with the exact amount string."""
    assert (200, ACK) == outcome(await client.finalize(charge(1, 1234)))
    assert (409, ACK) == outcome(await client.finalize(charge(1, 1234)))
    assert 401 == (await http.get(FINALIZED_PATH)).status_code  # the list needs a token too
    page = await client.list_finalized()
    item = FinalizedItem(ulid(1), "acct-1", 1234, "trace-1", clock.now, 2)
    assert ((item,), None) == (page.items, page.next_cursor)


async def test_conflicting_repeat_is_409_and_recorded(
    client: SettlementClient, server: SimulatorServer, clock: FakeClock
) -> None:
    """A repeat with another amount is 409 (ACK) but recorded as a conflict; the first amount stands."""
    await client.finalize(charge(1, 1234))
    clock.advance(5)
    attempt = await client.finalize(charge(1, 999))
    assert (409, ACK, "HTTP 409: conflict") == (attempt.status, attempt.verdict, attempt.reason)
    record = server.state.book.get(ulid(1))
    assert record is not None
    assert (1234, 1, 999, clock.now) == (
        record.actual_cost_micro,
        record.conflicts_total,
        record.conflicts[0].actual_cost_micro,
        record.conflicts[0].at_ms,
    )
    assert 1 == server.state.stats()["conflicts"]


async def test_list_pages_with_a_cursor(
    client: SettlementClient, http: httpx.AsyncClient, key: SigningKey, clock: FakeClock
) -> None:
    """Five finalized reservations come back in order, two per page; a bad cursor is 400."""
    for n in range(5):
        await client.finalize(charge(n, 100 + n))
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(3):
        page = await client.list_finalized(cursor, limit=2)
        seen.extend(item.reservation_id for item in page.items)
        cursor = page.next_cursor
    assert ([ulid(n) for n in range(5)], None) == (seen, cursor)
    bad = await http.get(FINALIZED_PATH, params={"cursor": "99"}, headers=list_headers(key, clock))
    assert 400 == bad.status_code


def list_headers(key: SigningKey, clock: FakeClock) -> dict[str, str]:
    claims = audit_claims(issuer="tollway", audience="arrakis", tenant_id="tenant-a", now_ms=clock())
    return {"Authorization": f"Bearer {key.sign(claims)}"}


async def test_restarted_simulator_still_answers_409(
    tmp_path: Path, sim_config: SimulatorConfig, key: SigningKey, clock: FakeClock
) -> None:
    """With a book file, a reservation finalized before a restart is 409 after it."""
    config = SimulatorConfig(keys=sim_config.keys, clock_ms=clock, state_path=tmp_path / "book.json")
    auth = SettlementAuth(signing_key=key)
    async with SimulatorServer(config) as first:
        assert (200, ACK) == outcome(await finalize_once(first, auth, clock))
    async with SimulatorServer(config) as second:
        assert (409, ACK) == outcome(await finalize_once(second, auth, clock))
        assert 1 == len(second.state.book)


# -- tokens the simulator refuses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("bad signature", "HTTP 401: unauthorized: bad signature"),
        ("unknown key", "HTTP 401: unauthorized: unknown kid"),
        ("wrong audience", "HTTP 401: unauthorized: wrong audience"),
        ("expired", "HTTP 401: unauthorized: expired"),
        ("hs256 not allowed", "HTTP 401: unauthorized: HS256 is not allowed"),
    ],
)
async def test_refused_tokens_are_401_poison(
    server: SimulatorServer, key: SigningKey, clock: FakeClock, case: str, reason: str
) -> None:
    """Every kind of bad token gets 401, which the client reports as POISON."""
    impostor = SigningKey(key.kid, generate_signing_key().private_key)
    auths = {
        "bad signature": (SettlementAuth(signing_key=impostor), clock),
        "unknown key": (SettlementAuth(signing_key=generate_signing_key()), clock),
        "wrong audience": (SettlementAuth(signing_key=key, audience="someone-else"), clock),
        "expired": (SettlementAuth(signing_key=key), FakeClock(clock.now - 331_000)),
        "hs256 not allowed": (SettlementAuth(hs256_secret=SECRET, allow_hs256=True), clock),
    }
    auth, signing_clock = auths[case]
    attempt = await finalize_once(server, auth, signing_clock)
    assert (401, POISON, reason) == (attempt.status, attempt.verdict, attempt.reason)


async def test_alg_none_and_missing_token_are_401(http: httpx.AsyncClient, key: SigningKey, clock: FakeClock) -> None:
    """An unsigned token or no token at all is 401, a POISON status."""
    body = json.dumps(finalize_body(charge())).encode()
    claims = finalize_claims(charge(), issuer="tollway", audience="arrakis", now_ms=clock())
    unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": key.kid})
    statuses = [(await post_raw(http, body, token)).status_code for token in (unsigned, None)]
    assert [401, 401] == statuses
    assert POISON == classify_status(401)


async def test_hs256_accepted_when_allowed(key: SigningKey, clock: FakeClock) -> None:
    """With allow_hs256 and the shared secret on both sides, HS256 calls finalize."""
    config = SimulatorConfig(allow_hs256=True, hs256_secret=SECRET, clock_ms=clock)
    async with SimulatorServer(config) as server:
        attempt = await finalize_once(server, SettlementAuth(hs256_secret=SECRET, allow_hs256=True), clock)
    assert (200, ACK) == outcome(attempt)


async def test_token_for_another_call_is_403(http: httpx.AsyncClient, key: SigningKey, clock: FakeClock) -> None:
    """A valid token bound to another reservation, account or purpose is 403."""
    body = json.dumps(finalize_body(charge(1))).encode()
    other_reservation = token_for(key, charge(2), clock)
    other_account = token_for(key, charge(1, account="acct-2"), clock)
    claims = finalize_claims(charge(1), issuer="tollway", audience="arrakis", now_ms=clock())
    other_purpose = key.sign({**claims, "purpose": "billing_audit"})
    statuses = [(await post_raw(http, body, t)).status_code for t in (other_reservation, other_account, other_purpose)]
    assert [403, 403, 403] == statuses


# -- bodies the simulator refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[]", 400),
        (b'{"reservationId": "R", "accountId": "acct-1", "traceId": "t"}', 400),
        (b'{"reservationId": "R", "accountId": "acct-1", "actualCostMicro": 5, "traceId": "t"}', 400),
        (b'{"reservationId": "R", "accountId": "acct-1", "actualCostMicro": "05", "traceId": "t"}', 400),
        (b'{"reservationId": "R", "accountId": "acct-1", "actualCostMicro": "1.5", "traceId": "t"}', 400),
        (b'{"reservationId": "R", "accountId": "acct-1", "actualCostMicro": "-1", "traceId": "t"}', 400),
        (
            b'{"reservationId": "R", "accountId": "acct-1", "actualCostMicro": "9223372036854775808", "traceId": "t"}',
            422,
        ),
        (b'{"reservationId": "R", "accountId": "a b", "actualCostMicro": "5", "traceId": "t"}', 422),
        (b'{"reservationId": "not-a-ulid", "accountId": "acct-1", "actualCostMicro": "5", "traceId": "t"}', 422),
    ],
)
async def test_bad_bodies(http: httpx.AsyncClient, key: SigningKey, clock: FakeClock, body: bytes, status: int) -> None:
    """Malformed bodies are 400; well-formed but meaningless ones are 422 (both POISON)."""
    real_body = body.replace(b'"R"', json.dumps(ulid(1)).encode())
    response = await post_raw(http, real_body, token_for(key, charge(1), clock))
    assert (status, POISON) == (response.status_code, classify_status(response.status_code))


async def test_idempotency_key_and_size_limits(http: httpx.AsyncClient, key: SigningKey, clock: FakeClock) -> None:
    """No Idempotency-Key is 400, a different one 422, an oversized body 413."""
    body = json.dumps(finalize_body(charge(1))).encode()
    token = token_for(key, charge(1), clock)
    missing = await post_raw(http, body, token, idempotency_key=None)
    different = await post_raw(http, body, token, idempotency_key=ulid(2))
    huge = await post_raw(http, b" " * (65 * 1024) + body, token)
    assert [400, 422, 413] == [missing.status_code, different.status_code, huge.status_code]


async def test_client_refuses_unsendable_data(client: SettlementClient) -> None:
    """Data that cannot be sent is POISON without a call."""
    attempt = await client.finalize(FinalizeRequest("not-a-ulid", "acct-1", 5))
    assert (None, POISON, "invalid data: billing_entry_id must be a 26-character ULID") == (
        attempt.status,
        attempt.verdict,
        attempt.reason,
    )


# -- faults -------------------------------------------------------------------------------------


async def test_outage_is_503_retry_until_lifted(client: SettlementClient, http: httpx.AsyncClient) -> None:
    """While the outage is on, calls are 503 (RETRY); lifting it through the admin endpoint heals."""
    changed = await http.post("/admin/faults", json={"outage": True})
    assert (200, True) == (changed.status_code, changed.json()["outage"])
    attempt = await client.finalize(charge())
    assert (503, RETRY, "HTTP 503: outage: simulated outage") == (attempt.status, attempt.verdict, attempt.reason)
    await http.post("/admin/faults", json={"outage": False})
    assert (200, ACK) == outcome(await client.finalize(charge()))


async def test_status_override_422_is_poison(client: SettlementClient, http: httpx.AsyncClient) -> None:
    """A forced 422 reaches the client as POISON."""
    await http.post("/admin/faults", json={"status_override": 422})
    assert (422, POISON) == outcome(await client.finalize(charge()))


async def test_error_rate_one_is_retry(key: SigningKey, clock: FakeClock, sim_config: SimulatorConfig) -> None:
    """With error_rate=1 from the constructor every call is 500 or 503 (RETRY), reproducibly."""
    config = SimulatorConfig(keys=sim_config.keys, clock_ms=clock, faults=Faults(error_rate=1.0), seed=7)
    runs: list[list[int | None]] = []
    for _ in range(2):
        async with (
            SimulatorServer(config) as server,
            make_client(server, SettlementAuth(signing_key=key), clock) as made,
        ):
            attempts = [await made.finalize(charge(n)) for n in range(6)]
        assert {RETRY} == {a.verdict for a in attempts}
        runs.append([a.status for a in attempts])
    assert {500, 503} == set(runs[0])
    assert runs[0] == runs[1]


def test_fault_decision() -> None:
    """Outage beats an override, which beats the error rate; the rate splits 500/503 evenly."""
    assert 503 == fault_status(Faults(outage=True, status_override=422), 0.99)
    assert 422 == fault_status(Faults(status_override=422, error_rate=1.0), 0.1)
    assert [500, 503, None] == [fault_status(Faults(error_rate=0.5), roll) for roll in (0.2, 0.3, 0.5)]


async def test_latency_beyond_timeout_is_retry(
    server: SimulatorServer, http: httpx.AsyncClient, key: SigningKey, clock: FakeClock
) -> None:
    """A reply slower than the client's timeout is a RETRY; the late call still lands, so the retry is 409."""
    await http.post("/admin/faults", json={"latency_ms": 300})
    async with make_client(server, SettlementAuth(signing_key=key), clock, timeout_ms=100) as made:
        attempt = await made.finalize(charge())
        assert (None, RETRY, "timeout") == (attempt.status, attempt.verdict, attempt.reason)
        await http.post("/admin/faults", json={"latency_ms": 0})
        for _ in range(100):  # the simulator finishes the slow call ~300 ms after it started
            if server.state.book.get(ulid(1)) is not None:
                break
            await asyncio.sleep(0.01)
        assert (409, ACK) == outcome(await made.finalize(charge()))


async def test_unreachable_settlement_is_retry(key: SigningKey, clock: FakeClock) -> None:
    """Nothing listening on the port: a connect error, RETRY."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    auth = SettlementAuth(signing_key=key)
    async with SettlementClient.from_url(f"http://127.0.0.1:{port}", auth, clock_ms=clock) as made:
        attempt = await made.finalize(charge())
    assert (None, RETRY, True) == (attempt.status, attempt.verdict, attempt.reason.startswith("connect error: "))


# -- admin ----------------------------------------------------------------------------------------


async def test_admin_faults_and_stats(http: httpx.AsyncClient, client: SettlementClient) -> None:
    """Faults read and change through /admin/faults; bad changes are 400; stats count by status."""
    default = {"error_rate": 0.0, "latency_ms": 0, "outage": False, "status_override": None}
    assert default == (await http.get("/admin/faults")).json()
    bad = [await http.post("/admin/faults", json=change) for change in ({"error_rate": 2}, {"nope": 1}, [1])]
    assert [400, 400, 400] == [response.status_code for response in bad]
    await client.finalize(charge())
    await client.finalize(charge())
    await http.post("/admin/faults", json={"status_override": 500})
    await client.finalize(charge(2))
    stats = (await http.get("/admin/stats")).json()
    assert ({"200": 1, "409": 1, "500": 1}, 1) == (stats["finalize_calls"], stats["finalized"])


async def test_admin_needs_the_admin_token(server: SimulatorServer) -> None:
    """With an admin token configured, admin calls without it are 401."""
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as anonymous:
        statuses = [(await anonymous.get(path)).status_code for path in ("/admin/faults", "/admin/stats")]
        wrong = await anonymous.post("/admin/faults", json={"outage": True}, headers={"X-Admin-Token": "guess"})
    assert [401, 401, 401] == [*statuses, wrong.status_code]
    assert not server.state.faults.outage


# -- running it -----------------------------------------------------------------------------------


async def test_serve_simulator_runs_until_cancelled(sim_config: SimulatorConfig) -> None:
    """serve_simulator announces its URL when ready and stops cleanly when its task is cancelled."""
    ready = asyncio.Event()
    urls: list[str] = []
    task = asyncio.create_task(serve_simulator(sim_config, port=0, ready=ready, on_ready=urls.append))
    await asyncio.wait_for(ready.wait(), 10)
    async with httpx.AsyncClient(trust_env=False) as http:
        status = (await http.get(f"{urls[0]}/admin/faults", headers={"X-Admin-Token": ADMIN})).status_code
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (200, True) == (status, urls[0].startswith("http://127.0.0.1:"))


async def test_configuration_errors() -> None:
    """A simulator without keys, short secrets and bad URLs are startup errors."""
    with pytest.raises(ConfigError, match="needs a verification key"):
        SimulatorConfig()
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        SimulatorConfig(allow_hs256=True, hs256_secret=b"short")
    with pytest.raises(ConfigError, match="need a signing key"):
        SettlementAuth(hs256_secret=SECRET)
    auth = SettlementAuth(hs256_secret=SECRET, allow_hs256=True)
    with pytest.raises(ConfigError, match="absolute http"):
        SettlementClient.from_url("ftp://x", auth)
    with pytest.raises(ConfigError, match="timeout_ms"):
        SettlementClient.from_url("http://127.0.0.1:1", auth, timeout_ms=0)


def test_hs256_signing_is_explicit() -> None:
    """The HS256 token the client makes is HS256 with no kid."""
    token = SettlementAuth(hs256_secret=SECRET, allow_hs256=True).token({"aud": "arrakis", "exp": 1})
    assert ({"alg": ALG_HS256, "typ": "JWT"}, token) == (
        jwt.get_unverified_header(token),
        sign({"aud": "arrakis", "exp": 1}, SECRET, None, ALG_HS256),
    )


async def test_keys_from_files(tmp_path: Path, key: SigningKey, clock: FakeClock) -> None:
    """A simulator started with a public-key PEM file trusts that key."""
    (tmp_path / "settlement.pub.pem").write_bytes(key.public().to_pem())
    config = SimulatorConfig(key_files=(tmp_path / "settlement.pub.pem",), clock_ms=clock)
    async with SimulatorServer(config) as server:
        assert (200, ACK) == outcome(await finalize_once(server, SettlementAuth(signing_key=key), clock))


async def test_admin_without_token_is_loopback_only(key: SigningKey) -> None:
    """With no admin token configured, loopback clients may use /admin and others may not."""
    app = create_simulator_app(SimulatorConfig(keys={key.kid: key.public()}))
    statuses = []
    for peer in ("127.0.0.1", "10.0.0.7"):
        transport = httpx.ASGITransport(app=app, client=(peer, 40_000))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as http:
            statuses.append((await http.get("/admin/stats")).status_code)
    assert [200, 403] == statuses
