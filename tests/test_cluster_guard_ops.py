"""The conservation guard per shard on cluster nodes, in one process: the gate, the fan-out, reset, bypass, metrics.

Two nodes on the test's PostgreSQL, each with its API over ASGI; node ``b`` forwards to and
fans out to node ``a`` through an ASGI transport, so the routing and the fan-out are the real
code paths (``a`` cannot reach ``b``). The multi-process test with Redis is
``test_cluster_guard.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.in_process_node import node_client
from tests.test_cluster_node_ops import SHARDS, TIMING, account_of, samples, settle
from tollway import Settings
from tollway.api.auth import Authenticator, Scope, development_key, issue_token
from tollway.cluster.node import Node
from tollway.core import events as ev
from tollway.guard import AUDIT_GUARD_BYPASS, AUDIT_GUARD_RESET, BYPASS_ACTOR
from tollway.pg.log import PgLog
from tollway.pg.schema import init_cluster, open_cluster
from tollway.pricing import default_prices


@dataclass
class Pair:
    """Nodes ``a`` and ``b`` with a client to each (``b`` forwards and fans out to ``a``)."""

    a: Node
    b: Node
    to_a: httpx.AsyncClient
    to_b: httpx.AsyncClient
    admin: dict[str, str]
    gateway: dict[str, str]


async def _pair(pool: asyncpg.Pool, tmp_path: Path, *, bypass: bool = False) -> AsyncIterator[Pair]:
    async with pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
        info = await open_cluster(connection)
    settings = Settings(data_dir=tmp_path)
    key, _ = development_key(settings)
    admin = issue_token(key, settings, [Scope.ADMIN.value], subject="ops-alice", ttl_s=600)
    gateway = issue_token(key, settings, [Scope.GATEWAY.value], subject="gw", ttl_s=600)
    auth = Authenticator.from_settings(settings)
    a = Node(pool, info, settings, node_id="a", advertise_url="http://a.invalid", timing=TIMING, guard_bypass=bypass)
    b = Node(pool, info, settings, node_id="b", advertise_url="http://b.invalid", timing=TIMING, guard_bypass=bypass)
    await settle(a, b)

    def app(node: Node, forwarder: httpx.AsyncClient) -> httpx.AsyncClient:
        return node_client(node, authenticator=auth, pricing=default_prices(), forwarder=forwarder)

    async with httpx.AsyncClient() as nowhere:
        to_a = app(a, nowhere)
        async with to_a, app(b, to_a) as to_b:
            yield Pair(a, b, to_a, to_b, {"authorization": f"Bearer {admin}"}, {"authorization": f"Bearer {gateway}"})
    await a.leave()
    await b.leave()


@pytest.fixture
async def pair(pg_pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Pair]:
    """Two settled nodes, guards as configured by default."""
    async for made in _pair(pg_pool, tmp_path):
        yield made


async def _audits(pool: asyncpg.Pool, shard: int) -> list[tuple[str, str]]:
    """The (action, actor) of every audit event in shard ``shard``'s log."""
    events = await PgLog(pool, shard).read(0, 10_000)
    return [(e.payload.action, e.payload.actor) for e in events if isinstance(e.payload, ev.Audit)]


async def _fund(pair: Pair, account: str) -> None:
    credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 10_000}
    answer = await pair.to_b.post(f"/v1/accounts/{account}/credits", json=credit, headers=pair.admin)
    assert 201 == answer.status_code, answer.text


async def _reserve(pair: Pair, account: str, request_id: str) -> httpx.Response:
    hold = {"account_id": account, "request_id": request_id, "estimated_cost_micro": 100}
    return await pair.to_b.post("/v1/reservations", json=hold, headers=pair.gateway)


async def test_every_shards_guard_is_ready_and_answered_through_any_node(pair: Pair) -> None:
    """GET /v1/guard through b: every shard's guard, ready, from its owner; /readyz and /metrics show them."""
    answer = await pair.to_b.get("/v1/guard", headers=pair.admin)
    body = answer.json()
    owners = dict.fromkeys((str(n) for n in pair.a.local_engines()), "a") | dict.fromkeys(
        (str(n) for n in pair.b.local_engines()), "b"
    )
    ready = await pair.to_a.get("/readyz")
    scraped = samples((await pair.to_a.get("/metrics")).text)
    a_shard = str(min(pair.a.local_engines()))
    assert 200 == answer.status_code, answer.text
    assert ("ready", True, [], []) == (
        body["state"],
        body["holds_allowed"],
        body["unserved_shards"],
        body["unreachable_nodes"],
    )
    assert owners == body["owners"]
    assert [str(n) for n in range(SHARDS)] == list(body["shards"])
    assert {"ready"} == {part["state"] for part in body["shards"].values()}
    assert all(len(part["checks"]) == 6 for part in body["shards"].values())  # no Redis: no parity check
    assert 200 == ready.status_code, ready.text
    assert "guard" not in ready.json()["not_running"]
    assert sorted(str(n) for n in pair.a.local_engines()) == sorted(ready.json()["guard"]["shards"])
    assert 1.0 == scraped[("billing_guard_state", (("shard", a_shard), ("state", "ready")))]
    assert 0.0 == scraped[("billing_guard_state", (("shard", a_shard), ("state", "degraded")))]
    assert 0.0 == scraped[("billing_guard_recovery_stopped", (("shard", a_shard),))]


async def test_a_degraded_shard_refuses_holds_alone_commits_go_on_and_a_reset_through_another_node_clears_it(
    pair: Pair, pg_pool: asyncpg.Pool
) -> None:
    """One shard's guard degraded: its holds get the guard's 503, other shards' do not, commits pass; reset via b."""
    sick_account, well_account = account_of(pair.a), account_of(pair.b)
    sick = pair.a.shard_of_account(sick_account)
    for account in (sick_account, well_account):
        await _fund(pair, account)
    held = await _reserve(pair, sick_account, "r1")
    assert 201 == held.status_code, held.text
    guard = pair.a.local_guards()[sick].runner
    guard.projection_diverged("a test says the projection differs")  # as the projector or the parity check would

    refused = await _reserve(pair, sick_account, "r2")
    elsewhere = await _reserve(pair, well_account, "r3")
    commit = await pair.to_b.post(
        f"/v1/reservations/{held.json()['billing_entry_id']}/commit",
        json={"actual_cost_micro": 60},
        headers=pair.gateway,
    )
    view = (await pair.to_b.get("/v1/guard", headers=pair.admin)).json()
    ready = await pair.to_a.get("/readyz")
    scraped = samples((await pair.to_a.get("/metrics")).text)
    assert (503, "BILLING_EVALUATOR_UNAVAILABLE", "30") == (
        refused.status_code,
        refused.json()["error"],
        refused.headers["retry-after"],
    )
    assert 201 == elsewhere.status_code, elsewhere.text
    assert 200 == commit.status_code, commit.text
    assert ("degraded", False) == (view["state"], view["holds_allowed"])
    assert ("degraded", True) == (view["shards"][str(sick)]["state"], view["shards"][str(sick)]["recovery_stopped"])
    assert {"ready"} == {part["state"] for n, part in view["shards"].items() if n != str(sick)}
    assert (503, False) == (ready.status_code, ready.json()["guard"]["shards"][str(sick)]["holds_allowed"])
    assert 1.0 == scraped[("billing_guard_state", (("shard", str(sick)), ("state", "degraded")))]
    assert (
        1.0 == scraped[("billing_invariant_violations_total", (("check", "projection_parity"), ("shard", str(sick))))]
    )

    reset = await pair.to_b.post(f"/v1/guard/reset?shard={sick}", headers=pair.admin)
    assert 200 == reset.status_code, reset.text
    assert ({str(sick): "a"}, "ready", [str(sick)]) == (
        reset.json()["owners"],
        reset.json()["state"],
        list(reset.json()["shards"]),
    )
    assert 201 == (await _reserve(pair, sick_account, "r4")).status_code
    assert 200 == (await pair.to_a.get("/readyz")).status_code
    assert [(AUDIT_GUARD_RESET, "ops-alice")] == await _audits(pg_pool, sick)


async def test_guard_operations_are_for_admins_and_name_a_real_shard(pair: Pair) -> None:
    """A gateway token is refused (403); a shard beyond the cluster is invalid (400); one shard asked, one answered."""
    gateway = await pair.to_b.get("/v1/guard", headers=pair.gateway)
    beyond = await pair.to_b.post(f"/v1/guard/reset?shard={SHARDS}", headers=pair.admin)
    one = (await pair.to_b.get("/v1/guard?shard=1", headers=pair.admin)).json()
    assert (403, 400) == (gateway.status_code, beyond.status_code)
    assert (["1"], []) == (list(one["shards"]), one["unserved_shards"])


async def test_the_bypass_opens_every_shards_gate_and_is_audited_in_each_shards_log(
    pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """TOLLWAY_GUARD_BYPASS: every shard's guard bypassed, each bypass an audit event in that shard's log."""
    async for pair in _pair(pg_pool, tmp_path, bypass=True):
        body = (await pair.to_b.get("/v1/guard", headers=pair.admin)).json()
        assert ("bypassed", True) == (body["state"], body["holds_allowed"])
        assert {"bypassed"} == {part["state"] for part in body["shards"].values()}
        for number in range(SHARDS):  # once per start of the shard (a shard handed from a to b: twice)
            assert {(AUDIT_GUARD_BYPASS, BYPASS_ACTOR)} == set(await _audits(pg_pool, number))
