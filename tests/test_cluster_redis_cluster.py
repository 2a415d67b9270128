"""Cluster mode on a Redis Cluster of three masters, real processes (issue 19, CLUSTER.md §5-6).

Three tollway nodes, the embedded PostgreSQL, the settlement simulator and three Redis masters
on loopback. Each shard's keys share its hash tag, so each shard lives in one slot of one
master; the nodes reach them through redis-py's cluster client (found from ``INFO``). Under
load: projection parity per shard. Then the master holding the most shards is killed and
restarted empty: billing goes on from PostgreSQL meanwhile, the lost projections are rebuilt
from the shards' state, and every charge is finalized exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import Cluster, run_cli
from tests.e2e_support import Simulator
from tests.redis_cluster_support import RedisClusterNodes
from tests.test_cluster_nodes import Load, Traffic, mint_all
from tests.test_cluster_settlement import LEASE_TTL_MS, NODE_ENV, SHARDS, _parity, _wait_finalized
from tollway.redis.keys import Keys

LOAD_S: Final = 2.0

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def stack(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Cluster, Simulator, RedisClusterNodes]]:
    """Three Redis masters, the simulator and three tollway nodes on them, settled."""
    masters = RedisClusterNodes(tmp_path / "redis-cluster")
    sim = Simulator(tmp_path / "keys", tmp_path)
    made: Cluster | None = None
    try:
        await masters.start()
        await sim.ready()
        made = Cluster(
            pg_url,
            tmp_path,
            shards=SHARDS,
            lease_ttl_ms=LEASE_TTL_MS,
            node_args=("--redis-url", masters.url, "--settlement-url", sim.url),
            node_env=NODE_ENV,
        )
        await made.start(3)
        async with httpx.AsyncClient(timeout=10) as client:
            await made.settled(client, made.nodes)
        yield made, sim, masters
    finally:
        if made is not None:
            made.close()
        await sim.close()
        masters.close()


async def _load_for(traffic: Traffic, seconds: float, first_worker: int) -> None:
    traffic.stop.clear()
    workers = [asyncio.create_task(traffic.worker(first_worker + n)) for n in range(8)]
    await asyncio.sleep(seconds)
    traffic.stop.set()
    await asyncio.gather(*workers)


async def test_a_redis_cluster_serves_every_shard_and_a_master_restarted_empty_is_rebuilt(
    stack: tuple[Cluster, Simulator, RedisClusterNodes], pg_url: str
) -> None:
    """Parity per shard on three masters; one killed and restarted empty: rebuilt, every charge settled once."""
    cluster, sim, masters = stack
    redis_client = RedisCluster.from_url(masters.url)
    try:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            load = Load(cluster, client, cluster.nodes)
            await mint_all(load, 1_000_000)
            traffic = Traffic(load, cluster.gateway)
            await _load_for(traffic, LOAD_S, 0)
            committed = sum(len(entries) for entries in traffic.committed.values())
            await _wait_finalized(load, sim, committed)
            assert {n: [] for n in range(SHARDS)} == await _parity(pg_url, redis_client)
            homes = Counter(masters.master_of(Keys("tw", str(n)).meta) for n in range(SHARDS))
            assert 3 == len(homes), homes  # the shards are spread over the three masters

            victim = homes.most_common(1)[0][0]
            masters.kill(victim)
            await _load_for(traffic, LOAD_S, 100)  # billing goes on from PostgreSQL
            await masters.restart(victim)
            await _load_for(traffic, LOAD_S, 200)
            committed_entries = [entry for entries in traffic.committed.values() for entry in entries]
            await _wait_finalized(load, sim, len(committed_entries))
            await traffic.check_balances(1_000_000)
        assert {n: [] for n in range(SHARDS)} == await _parity(pg_url, redis_client)
        rebuilt = [
            n
            for n in range(SHARDS)
            if masters.master_of(Keys("tw", str(n)).meta) == victim
            and await redis_client.hget(Keys("tw", str(n)).meta, "rebuilt_at_ms") is not None
        ]
        assert homes[victim] == len(rebuilt)
    finally:
        await redis_client.aclose()
    assert [] == load.other_failures
    finalized = await sim.finalized()
    assert [] == [key for key, n in Counter(item.reservation_id for item in finalized).items() if n > 1]
    assert dict.fromkeys(committed_entries, 7) == {item.reservation_id: item.actual_cost_micro for item in finalized}
    stats = await sim.stats()
    assert (len(committed_entries), 0) == (stats["finalized"], stats["conflicts"])
    audit = run_cli("cluster", "audit", "--postgres-url", pg_url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr
