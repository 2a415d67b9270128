"""Shard leases and the node registry in PostgreSQL: one owner at a time, epochs that only grow (CLUSTER.md §3-4)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from tollway.core.errors import InvalidInput
from tollway.pg import leases
from tollway.pg.schema import init_cluster

SHARDS = 8


def mono_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@pytest.fixture
async def cluster(pg_pool: asyncpg.Pool) -> asyncpg.Pool:
    """An eight-shard cluster on a fresh database."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
    return pg_pool


async def test_a_held_lease_cannot_be_taken_and_epochs_grow(cluster: asyncpg.Pool) -> None:
    """Only a free or released lease is acquired; each acquisition, even by the same node, bumps the epoch."""
    first = await leases.acquire(cluster, 0, "node-a", 30_000, mono_ms())
    assert first is not None
    assert await leases.acquire(cluster, 0, "node-b", 30_000, mono_ms()) is None
    assert await leases.acquire(cluster, 0, "node-a", 30_000, mono_ms()) is None
    assert await leases.release(cluster, first)
    assert not await leases.release(cluster, first)
    second = await leases.acquire(cluster, 0, "node-b", 30_000, mono_ms())
    assert second is not None
    assert await leases.release(cluster, second)
    third = await leases.acquire(cluster, 0, "node-b", 30_000, mono_ms())
    assert third is not None
    assert ([1, 2, 3], ["node-a", "node-b", "node-b"]) == (
        [first.epoch, second.epoch, third.epoch],
        [first.owner, second.owner, third.owner],
    )


async def test_two_would_be_owners_at_once_one_wins(pg_url: str, cluster: asyncpg.Pool) -> None:
    """Nodes racing for every shard through their own connections: each shard gets exactly one owner."""
    pools = [await asyncpg.create_pool(pg_url, min_size=SHARDS, max_size=SHARDS) for _ in range(2)]
    try:
        attempts = [
            leases.acquire(pool, shard, f"node-{n}", 30_000, mono_ms())
            for shard in range(SHARDS)
            for n, pool in enumerate(pools)
        ]
        won = [lease for lease in await asyncio.gather(*attempts) if lease is not None]
    finally:
        for pool in pools:
            await pool.close()
    rows = await leases.lease_rows(cluster)
    assert list(range(SHARDS)) == sorted(lease.shard for lease in won)
    assert {(lease.shard, lease.owner, 1) for lease in won} == {(row.shard, row.owner, row.epoch) for row in rows}


async def test_expiry_is_by_postgresqls_clock(cluster: asyncpg.Pool) -> None:
    """A lease not renewed is taken by another node only once PostgreSQL's clock passes its expiry."""
    held = await leases.acquire(cluster, 5, "node-a", leases.TTL_MS_MIN, mono_ms())
    assert held is not None
    expires_at = (await leases.lease_rows(cluster))[5].expires_at
    # polling PostgreSQL is the point: its clock, not ours, says when the lease is free
    while (taken := await leases.acquire(cluster, 5, "node-b", 30_000, mono_ms())) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    acquired_at = await cluster.fetchval("SELECT acquired_at FROM tollway.leases WHERE shard = 5")
    assert expires_at is not None
    assert acquired_at >= expires_at
    assert (2, "node-b") == (taken.epoch, taken.owner)
    assert await leases.renew(cluster, held, 30_000, mono_ms()) is None


async def test_renewal_extends_only_the_owners_live_lease(cluster: asyncpg.Pool) -> None:
    """renew moves the expiry forward for the holder; a stale epoch or another owner cannot renew."""
    held = await leases.acquire(cluster, 1, "node-a", 1_000, mono_ms())
    assert held is not None
    before = (await leases.lease_rows(cluster))[1].expires_at
    renewed = await leases.renew(cluster, held, 60_000, mono_ms())
    after = (await leases.lease_rows(cluster))[1].expires_at
    assert renewed is not None
    assert before is not None
    assert after is not None
    assert after > before
    assert renewed.deadline_mono_ms() == renewed.sent_mono_ms + 60_000
    impostor = leases.Lease(1, held.epoch, "node-b", 1_000, mono_ms(), 0)
    assert await leases.renew(cluster, impostor, 60_000, mono_ms()) is None
    with pytest.raises(InvalidInput):
        await leases.renew(cluster, held, 10, mono_ms())


async def test_nodes_register_heartbeat_and_age_out(cluster: asyncpg.Pool) -> None:
    """Registered nodes are live while their heartbeat is young by PostgreSQL's clock; deregistered ones vanish."""
    await leases.heartbeat(cluster, "node-b", "http://127.0.0.1:9002")
    await leases.heartbeat(cluster, "node-a", "http://127.0.0.1:9001")
    await leases.heartbeat(cluster, "node-a", "http://127.0.0.1:9011")
    assert [("node-a", "http://127.0.0.1:9011"), ("node-b", "http://127.0.0.1:9002")] == [
        (node.node_id, node.advertise_url) for node in await leases.live_nodes(cluster, 10_000)
    ]
    await cluster.execute(
        "UPDATE tollway.nodes SET heartbeat_at = now() - interval '11 seconds' WHERE node_id = 'node-b'"
    )
    assert ["node-a"] == [node.node_id for node in await leases.live_nodes(cluster, 10_000)]
    await leases.deregister(cluster, "node-a")
    assert [] == await leases.live_nodes(cluster, 10_000)
