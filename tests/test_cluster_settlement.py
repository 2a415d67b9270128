"""Settlement in cluster mode, real processes: three nodes, PostgreSQL, one Redis, the settlement simulator.

Every shard's projection and finalize queue live in the one Redis under the shard's hash tag,
and its projector and finalize worker run on the shard's owner, moving with the lease. Under
load, with one node killed (``kill -9``): every acknowledged commit is finalized exactly once
(the simulator saw each once, every entry is FINALIZE_ACKED, nothing unsettled), the projection
of every shard equals the shard's fold from PostgreSQL, and the killed node's epoch can no
longer write its shards' projections.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import Cluster, run_cli
from tests.e2e_support import Simulator
from tests.test_cluster_nodes import ACCOUNTS, Load, Traffic, mint_all
from tollway.cluster.shard_log import recover_state
from tollway.cluster.shard_redis import projection_owner
from tollway.core.shard import shard
from tollway.pg.log import PgLog
from tollway.pg.schema import open_cluster
from tollway.redis.keys import Keys
from tollway.redis.parity import differences
from tollway.redis.projection import encode_batch
from tollway.redis.projector import load_script
from tollway.redis.server import EmbeddedRedis

SHARDS: Final = 8
LEASE_TTL_MS: Final = 3_000  # 2 s leases churned under a load average of 17 on two cores
FINALIZE_TIMEOUT_S: Final = 90.0
NODE_ENV: Final = {"TOLLWAY_CLAIM_IDLE_MS": "1000"}  # a dead node's delivered messages are reclaimed soon

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def stack(pg_url: str, tmp_path: Path, redis_server: EmbeddedRedis) -> AsyncIterator[tuple[Cluster, Simulator]]:
    """The simulator (trusting the nodes' settlement key) and three nodes with Redis and settlement, settled."""
    keys_dir = tmp_path / "keys"
    sim = Simulator(keys_dir, tmp_path)  # creates the settlement key the nodes sign with
    await sim.ready()
    made = Cluster(
        pg_url,
        tmp_path,
        shards=SHARDS,
        lease_ttl_ms=LEASE_TTL_MS,
        node_args=("--redis-url", redis_server.url, "--settlement-url", sim.url),
        node_env=NODE_ENV,
    )
    try:
        await made.start(3)
        async with httpx.AsyncClient(timeout=10) as client:
            await made.settled(client, made.nodes)
        yield made, sim
    finally:
        made.close()
        await sim.close()


async def _acked_entries(load: Load) -> Counter[str]:
    """Entries of every account by state, read through the nodes."""
    states: Counter[str] = Counter()
    for account in ACCOUNTS:
        cursor: str | None = None
        while True:
            path = f"/v1/accounts/{account}/entries?limit=1000" + (f"&cursor={cursor}" if cursor else "")
            page = (await load.send("GET", path)).json()
            states.update(item["state"] for item in page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
    return states


async def _wait_finalized(load: Load, sim: Simulator, count: int) -> None:
    deadline = time.monotonic() + FINALIZE_TIMEOUT_S
    while True:
        states = await _acked_entries(load)
        stats = await sim.stats()
        if {"FINALIZE_ACKED": count} == dict(states) and stats["finalized"] == count:
            return
        assert time.monotonic() < deadline, f"not all finalized within {FINALIZE_TIMEOUT_S} s: {states}, {stats}"
        await asyncio.sleep(0.5)


async def _parity(pg_url: str, client: redis.asyncio.Redis | RedisCluster) -> dict[int, list[str]]:
    """Each shard's projection against its fold from PostgreSQL, once the projection caught up."""
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    try:
        found: dict[int, list[str]] = {}
        for number in range(SHARDS):
            state = await recover_state(PgLog(pool, number))
            keys = Keys("tw", str(number))
            deadline = time.monotonic() + 30
            while int(await client.hget(keys.meta, "applied_seq") or 0) != state.last_sequence:
                assert time.monotonic() < deadline, f"shard {number} projection not caught up"
                await asyncio.sleep(0.1)
            found[number] = await differences(client, keys, state)  # type: ignore[arg-type]  # same commands
        return found
    finally:
        await pool.close()


async def _cluster_id(pg_url: str) -> str:
    connection = await asyncpg.connect(pg_url)
    try:
        return (await open_cluster(connection)).cluster_id
    finally:
        await connection.close()


async def test_three_nodes_finalize_every_charge_once_through_a_kill_9_with_parity_and_the_epoch_guard(
    stack: tuple[Cluster, Simulator], pg_url: str, redis_server: EmbeddedRedis
) -> None:
    """Load on three nodes, one killed: each commit settled once, projections equal the log, old epoch refused."""
    cluster, sim = stack
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        load = Load(cluster, client, cluster.nodes)
        await mint_all(load, 1_000_000)
        owners = await cluster.settled(client, cluster.nodes)
        victim = cluster.nodes[2]
        orphan_shards = sorted(n for n, owner in owners.items() if owner == victim.name)
        epochs_before = {
            row["shard"]: row["epoch"] for row in (await cluster.view(client, cluster.nodes[0]))["shard_map"]
        }
        traffic = Traffic(load, cluster.gateway)
        workers = [asyncio.create_task(traffic.worker(n)) for n in range(12)]
        await asyncio.sleep(2.0)
        victim.signal(signal.SIGKILL)
        survivors = cluster.nodes[:2]
        load.nodes = survivors
        await asyncio.sleep(LEASE_TTL_MS / 1000 + 2.0)
        traffic.stop.set()
        await asyncio.gather(*workers)
        committed = [entry for entries in traffic.committed.values() for entry in entries]
        await _wait_finalized(load, sim, len(committed))
        await traffic.check_balances(1_000_000)
        balances = [(await load.send("GET", f"/v1/accounts/{a}")).json() for a in ACCOUNTS]
        view = await cluster.view(client, survivors[0])

    assert [] == load.other_failures
    assert [] == load.overlaps()
    assert ["0"] * len(ACCOUNTS) == [balance["unsettled_micro"] for balance in balances]
    finalized = await sim.finalized()
    assert [] == [key for key, n in Counter(item.reservation_id for item in finalized).items() if n > 1]
    assert dict.fromkeys(committed, 7) == {item.reservation_id: item.actual_cost_micro for item in finalized}
    stats = await sim.stats()
    assert (len(committed), 0) == (stats["finalized"], stats["conflicts"])
    assert any(shard(a, SHARDS) in orphan_shards for a in ACCOUNTS)

    client_redis = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert {n: [] for n in range(SHARDS)} == await _parity(pg_url, client_redis)
        epochs_now = {row["shard"]: row["epoch"] for row in view["shard_map"]}
        cluster_id = await _cluster_id(pg_url)
        for number in orphan_shards:  # the new owner's epoch is recorded; the victim's can no longer write
            keys = Keys("tw", str(number))
            assert epochs_now[number] > epochs_before[number]
            assert str(epochs_now[number]).encode() == await client_redis.hget(keys.meta, "epoch")
            assert await _old_epoch_refused(
                client_redis, pg_url, keys, cluster_id=cluster_id, number=number, old_epoch=epochs_before[number]
            )
    finally:
        await client_redis.aclose()
    audit = run_cli("cluster", "audit", "--postgres-url", pg_url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr


async def _old_epoch_refused(
    client: redis.asyncio.Redis, pg_url: str, keys: Keys, *, cluster_id: str, number: int, old_epoch: int
) -> bool:
    """apply_batch.lua with the shard's last event under the killed owner's epoch: refused, nothing changed."""
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    try:
        log = PgLog(pool, number)
        last = await log.last_seq()
        events = await log.read(last - 1, 1)
    finally:
        await pool.close()
    before = await client.hgetall(keys.meta)
    batch = encode_batch(keys, events, projection_owner(cluster_id, number), old_epoch)
    reply: list[Any] = await client.eval(load_script("apply_batch.lua"), len(batch.keys), *batch.keys, *batch.argv)
    return reply[0] == b"stale" and before == await client.hgetall(keys.meta)


async def _dead_letters(client: httpx.AsyncClient, cluster: Cluster, url: str) -> list[dict[str, Any]]:
    """Every dead letter of the cluster, read through one node in pages of three."""
    items: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(1_000):  # a bound
        params = {"limit": "3", **({"after": after} if after else {})}
        response = await client.get(f"{url}/v1/settlement/poison", params=params, headers=cluster.auth())
        assert 200 == response.status_code, response.text
        page = response.json()
        items += page["items"]
        after = page["next_after"]
        if after is None:
            return items
    raise AssertionError("the dead-letter pages did not end")


async def test_dead_letters_of_every_shard_are_listed_and_replayed_through_any_node(
    stack: tuple[Cluster, Simulator],
) -> None:
    """Settlement refusing (422): each shard's dead letters listed through one node; a replay on another acks all."""
    cluster, sim = stack
    await sim.set_faults(status_override=422)
    async with httpx.AsyncClient(timeout=60) as client:
        load = Load(cluster, client, cluster.nodes)
        await mint_all(load, 1_000_000)
        traffic = Traffic(load, cluster.gateway)
        for i, account in enumerate(ACCOUNTS):
            await traffic.pair(account, f"dead-{i}")
        committed = {entry for entries in traffic.committed.values() for entry in entries}
        deadline = time.monotonic() + FINALIZE_TIMEOUT_S
        while len(letters := await _dead_letters(client, cluster, cluster.nodes[0].url)) < len(committed):
            assert time.monotonic() < deadline, f"{len(letters)} dead letters of {len(committed)}"
            await asyncio.sleep(0.5)
        assert committed == {letter["billing_entry_id"] for letter in letters}
        assert {shard(a, SHARDS) for a in ACCOUNTS} == {letter["shard"] for letter in letters}
        breaker = (await client.get(f"{cluster.nodes[1].url}/v1/settlement/breaker", headers=cluster.auth())).json()
        assert ("CLOSED", [], [], [str(n) for n in range(SHARDS)]) == (
            breaker["state"],
            breaker["unserved_shards"],
            breaker["unreachable_nodes"],
            list(breaker["shards"]),
        )

        await sim.set_faults(status_override=None)
        replay = await client.post(f"{cluster.nodes[1].url}/v1/settlement/poison/replay", headers=cluster.auth())
        assert 200 == replay.status_code, replay.text
        report = replay.json()
        assert (len(committed), len(committed), 0, []) == (
            report["examined"],
            report["acked"],
            report["still_failing"],
            report["unserved_shards"],
        )
        assert {"FINALIZE_ACKED": len(committed)} == dict(await _acked_entries(load))
        reset = await client.post(f"{cluster.nodes[2].url}/v1/settlement/breaker/reset", headers=cluster.auth())
        assert (200, "CLOSED", SHARDS) == (reset.status_code, reset.json()["state"], len(reset.json()["shards"]))
        gateway = await client.get(
            f"{cluster.nodes[0].url}/v1/settlement/breaker", headers=cluster.auth(cluster.gateway)
        )
        assert 403 == gateway.status_code, gateway.text
    finalized = await sim.finalized()
    assert sorted(committed) == sorted(item.reservation_id for item in finalized)


async def test_a_graceful_hand_off_moves_projector_and_worker_and_finalizes_every_charge_once(
    stack: tuple[Cluster, Simulator], pg_url: str, redis_server: EmbeddedRedis
) -> None:
    """SIGTERM of a node under load: its shards' projections and queues go on under the new owners' epochs."""
    cluster, sim = stack
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        load = Load(cluster, client, cluster.nodes)
        await mint_all(load, 1_000_000)
        owners = await cluster.settled(client, cluster.nodes)
        leaving = cluster.nodes[1]
        moved = sorted(n for n, owner in owners.items() if owner == leaving.name)
        traffic = Traffic(load, cluster.gateway)
        workers = [asyncio.create_task(traffic.worker(n)) for n in range(12)]
        await asyncio.sleep(2.0)
        load.nodes = [cluster.nodes[0], cluster.nodes[2]]
        assert 0 == await leaving.process.stop(signal.SIGTERM)
        await asyncio.sleep(2.0)
        traffic.stop.set()
        await asyncio.gather(*workers)
        committed = [entry for entries in traffic.committed.values() for entry in entries]
        await _wait_finalized(load, sim, len(committed))
        view = await cluster.view(client, cluster.nodes[0])
    assert [] == load.other_failures
    finalized = await sim.finalized()
    assert sorted(committed) == sorted(item.reservation_id for item in finalized)
    assert (len(committed), 0) == ((await sim.stats())["finalized"], (await sim.stats())["conflicts"])
    client_redis = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert {n: [] for n in range(SHARDS)} == await _parity(pg_url, client_redis)
        epochs = {row["shard"]: row["epoch"] for row in view["shard_map"]}
        recorded = {n: int(await client_redis.hget(Keys("tw", str(n)).meta, "epoch") or 0) for n in moved}
        assert {n: epochs[n] for n in moved} == recorded
        assert all(view_owner != leaving.name for view_owner in (row["owner"] for row in view["shard_map"]))
    finally:
        await client_redis.aclose()
