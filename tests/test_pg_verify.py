"""Verifying a cluster's log in PostgreSQL: sound shards pass, a tampered or truncated one is named."""

from __future__ import annotations

import time

import asyncpg

from tests.test_pg_log import make_events, records
from tollway.pg import leases
from tollway.pg.log import PgLog
from tollway.pg.schema import init_cluster
from tollway.pg.verify import ShardReport, verify_cluster


async def filled(pool: asyncpg.Pool) -> asyncpg.Pool:
    async with pool.acquire() as connection:
        await init_cluster(connection, shards=2)
    lease = await leases.acquire(pool, 1, "node-a", 30_000, time.monotonic_ns() // 1_000_000)
    assert lease is not None
    log = PgLog(pool, 1)
    await log.append(records(make_events(1, 7)), 1, lease.epoch)
    await log.write_snapshot(4, b"state", epoch=lease.epoch)
    return pool


async def test_a_sound_cluster_verifies(pg_pool: asyncpg.Pool) -> None:
    """Every shard is read back in pages and found sound, with its record and snapshot counts."""
    pool = await filled(pg_pool)
    assert [ShardReport(0, 0, 0, 0, None), ShardReport(1, 7, 7, 1, None)] == await verify_cluster(pool, page=3)


async def test_a_tampered_body_is_named(pg_pool: asyncpg.Pool) -> None:
    """A body changed in the database fails its checksum; the report names shard and sequence."""
    pool = await filled(pg_pool)
    await pool.execute("UPDATE tollway.events SET body = set_byte(body, 2, 32) WHERE shard = 1 AND seq = 5")
    report = (await verify_cluster(pool, page=3))[1]
    assert (4, "shard 1 sequence 5: checksum mismatch") == (report.records, report.problem)


async def test_a_missing_last_row_is_found(pg_pool: asyncpg.Pool) -> None:
    """Rows missing at the end of a shard's log (fewer than its last_seq) are a problem."""
    pool = await filled(pg_pool)
    await pool.execute("DELETE FROM tollway.events WHERE shard = 1 AND seq = 7")
    report = (await verify_cluster(pool))[1]
    assert "shard 1 holds 6 record(s) but its lease row says the log ends at 7" == report.problem
