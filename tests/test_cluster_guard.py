"""The conservation guard per shard on real cluster nodes: two ``tollway serve`` processes, PostgreSQL, one Redis.

Each shard's guard runs on its owner and checks, besides the state, that the shard's Redis
projection equals its state (every second here: ``TOLLWAY_PARITY_CHECK_INTERVAL_S=1``). A
balance changed in Redis behind tollway's back (``HINCRBY``) is found by that shard's guard:
the shard refuses new holds with the guard's 503 (no other shard does), commits still go
through, the divergence and the rebuild of the projection are audited in the shard's log, and
an admin reset through the *other* node (audited too) lets the shard take holds again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import pytest
import redis.asyncio

from tests.cluster_support import Cluster, Node, run_cli
from tests.e2e_support import sdk
from tests.test_cluster_node_ops import samples
from tollway.core import events as ev
from tollway.core.shard import shard
from tollway.guard import AUDIT_GUARD_RESET
from tollway.pg.log import PgLog
from tollway.redis.keys import Keys
from tollway.redis.projector import AUDIT_DIVERGENCE, AUDIT_REBUILT
from tollway.redis.server import EmbeddedRedis

SHARDS: Final = 8
LEASE_TTL_MS: Final = 3_000
NODE_ENV: Final = {"TOLLWAY_PARITY_CHECK_INTERVAL_S": "1"}
WAIT_S: Final = 60.0

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def cluster(pg_url: str, tmp_path: Path, redis_server: EmbeddedRedis) -> AsyncIterator[Cluster]:
    """Two nodes with the Redis projection, every shard served."""
    made = Cluster(
        pg_url,
        tmp_path,
        shards=SHARDS,
        lease_ttl_ms=LEASE_TTL_MS,
        node_args=("--redis-url", redis_server.url),
        node_env=NODE_ENV,
    )
    try:
        await made.start(2)
        async with httpx.AsyncClient(timeout=10) as client:
            await made.settled(client, made.nodes)
        yield made
    finally:
        made.close()


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.2)


def _account_on(owners: dict[int, str], node: Node, skip: int = 0) -> str:
    """An account whose shard ``node`` owns (the ``skip``-th such account)."""
    found = [f"acct-{i}" for i in range(1_000) if owners[shard(f"acct-{i}", SHARDS)] == node.name]
    return found[skip]


async def _audits(pg_url: str, number: int) -> list[tuple[str, str]]:
    """(action, actor) of every audit event in shard ``number``'s log in PostgreSQL."""
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    try:
        events = await PgLog(pool, number).read(0, 10_000)
    finally:
        await pool.close()
    return [(e.payload.action, e.payload.actor) for e in events if isinstance(e.payload, ev.Audit)]


class Api:
    """Requests to the nodes with the cluster's tokens."""

    def __init__(self, cluster: Cluster, client: httpx.AsyncClient) -> None:
        self.cluster = cluster
        self.client = client

    async def guard(self, node: Node, query: str = "") -> dict[str, Any]:
        answer = await self.client.get(f"{node.url}/v1/guard{query}", headers=self.cluster.auth())
        assert 200 == answer.status_code, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def reserve(self, node: Node, account: str, request_id: str) -> httpx.Response:
        hold = {"account_id": account, "request_id": request_id, "estimated_cost_micro": 1_000}
        return await self.client.post(
            f"{node.url}/v1/reservations", json=hold, headers=self.cluster.auth(self.cluster.gateway)
        )

    async def mint(self, node: Node, account: str) -> None:
        credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 1_000_000}
        answer = await self.client.post(
            f"{node.url}/v1/accounts/{account}/credits", json=credit, headers=self.cluster.auth()
        )
        assert 201 == answer.status_code, answer.text

    async def available(self, node: Node, account: str) -> int:
        answer = await self.client.get(f"{node.url}/v1/accounts/{account}", headers=self.cluster.auth())
        return int(answer.json()["available_micro"])


async def test_every_shards_guard_is_ready_on_its_owner_and_answered_through_any_node(cluster: Cluster) -> None:
    """Started with their shards, the guards are ready: each node shows all of them; holds are taken everywhere."""
    async with httpx.AsyncClient(timeout=30) as client:
        api = Api(cluster, client)
        owners = await cluster.settled(client, cluster.nodes)
        views = [await api.guard(node) for node in cluster.nodes]
        readies = [await client.get(f"{node.url}/readyz") for node in cluster.nodes]
        answers = []
        for n, node in enumerate(cluster.nodes):
            for owner in cluster.nodes:
                account = _account_on(owners, owner, skip=n)
                await api.mint(node, account)
                answers.append((await api.reserve(node, account, f"r-{n}")).status_code)
    expected_owners = {str(number): name for number, name in owners.items()}
    for view in views:
        assert ("ready", True, [], []) == (
            view["state"],
            view["holds_allowed"],
            view["unserved_shards"],
            view["unreachable_nodes"],
        )
        assert expected_owners == view["owners"]
        assert {"ready"} == {part["state"] for part in view["shards"].values()}
        assert all(
            {"projection_parity": "passed"}.items()
            <= {check["name"]: check["status"] for check in part["checks"]}.items()
            for part in view["shards"].values()
        )
    for node, ready in zip(cluster.nodes, readies, strict=True):
        assert 200 == ready.status_code, ready.text
        assert sorted(str(n) for n, name in owners.items() if name == node.name) == sorted(
            ready.json()["guard"]["shards"]
        )
    assert [201] * 4 == answers


async def test_a_projection_tampered_in_redis_degrades_that_shards_guard_only_until_an_admin_reset(
    cluster: Cluster, pg_url: str, redis_server: EmbeddedRedis
) -> None:
    """HINCRBY on a shard's projected balance: its guard alone refuses holds, commits pass; reset via the other node."""
    owner, other = cluster.nodes
    async with httpx.AsyncClient(timeout=30) as client:
        api = Api(cluster, client)
        owners = await cluster.settled(client, cluster.nodes)
        sick_account, well_account = _account_on(owners, owner), _account_on(owners, other)
        sick = shard(sick_account, SHARDS)
        for account in (sick_account, well_account):
            await api.mint(other, account)
        held = await api.reserve(other, sick_account, "before")
        assert 201 == held.status_code, held.text
        entry_id = held.json()["billing_entry_id"]
        expected = await api.available(owner, sick_account)
        store = redis.asyncio.Redis.from_url(redis_server.url)
        key = Keys("tw", str(sick)).account(sick_account)

        async def projected() -> int:
            return int(await store.hget(key, "available") or -1)

        async def degraded() -> bool:
            part: dict[str, Any] = (await api.guard(other, f"?shard={sick}"))["shards"].get(str(sick), {})
            return "degraded" == part.get("state")

        async def rebuilt() -> bool:
            return (AUDIT_REBUILT, "projector") in await _audits(pg_url, sick) and await projected() == expected

        try:
            await _eventually(lambda: _equal(projected(), expected), "the hold projected")
            await store.hincrby(key, "available", 1_000_000)  # money out of nowhere, behind tollway's back
            await _eventually(degraded, f"shard {sick}'s guard degraded")
            await _eventually(rebuilt, f"shard {sick}'s projection rebuilt from its log")
        finally:
            await store.aclose()
        view = await api.guard(other)
        refused = [await api.reserve(node, sick_account, "during") for node in cluster.nodes]
        elsewhere = await api.reserve(owner, well_account, "elsewhere")
        commit = await client.post(
            f"{other.url}/v1/reservations/{entry_id}/commit",
            json={"actual_cost_micro": 400},
            headers=cluster.auth(cluster.gateway),
        )
        owner_ready = await client.get(f"{owner.url}/readyz")
        other_ready = await client.get(f"{other.url}/readyz")
        scraped = samples((await client.get(f"{owner.url}/metrics")).text)

        async with sdk(other.url, cluster.admin) as admin:  # the SDK's reset_guard(shard=), through the non-owner
            reset = await admin.reset_guard(shard=sick)
        after = await api.reserve(other, sick_account, "after")
        ready_again = await client.get(f"{owner.url}/readyz")

    part = view["shards"][str(sick)]
    checks = {check["name"]: check["status"] for check in part["checks"]}
    assert ("degraded", False, True, "violated") == (
        view["state"],
        part["holds_allowed"],
        part["recovery_stopped"],
        checks["projection_parity"],
    )
    assert {"ready"} == {p["state"] for n, p in view["shards"].items() if n != str(sick)}
    assert [(503, "BILLING_EVALUATOR_UNAVAILABLE")] * 2 == [(r.status_code, r.json()["error"]) for r in refused]
    assert 201 == elsewhere.status_code, elsewhere.text
    assert (200, "COMMITTED") == (commit.status_code, commit.json()["state"])
    assert (503, "degraded") == (owner_ready.status_code, owner_ready.json()["guard"]["shards"][str(sick)]["state"])
    assert 200 == other_ready.status_code, other_ready.text
    assert 1.0 == scraped[("billing_guard_state", (("shard", str(sick)), ("state", "degraded")))]
    assert 1.0 == scraped[("billing_guard_recovery_stopped", (("shard", str(sick)),))]
    assert (
        1.0 <= scraped[("billing_invariant_violations_total", (("check", "projection_parity"), ("shard", str(sick))))]
    )
    assert ("ready", {str(sick): owner.name}, [str(sick)]) == (reset["state"], reset["owners"], list(reset["shards"]))
    assert 201 == after.status_code, after.text
    assert 200 == ready_again.status_code, ready_again.text
    audits = await _audits(pg_url, sick)
    assert (AUDIT_DIVERGENCE, "projector") in audits
    assert (AUDIT_GUARD_RESET, "tollway-cli") == audits[-1]
    audit = run_cli("cluster", "audit", "--postgres-url", pg_url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr


async def _equal(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
