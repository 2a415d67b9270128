"""A shard's engine on the log in PostgreSQL: fencing stops it, recovery folds snapshot rows and records."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from tollway import Settings
from tollway.cluster.shard_log import recover_state, start_shard_engine
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.errors import EngineStopped, LogUnavailable, ShardFenced
from tollway.core.shard import shard, shard_of_entry_id
from tollway.pg import leases
from tollway.pg.leases import Lease
from tollway.pg.log import PgLog
from tollway.pg.schema import init_cluster
from tollway.testing import FakeClock

SHARDS = 4
ACCOUNT = "alice"  # shard 3 of 4
TTL_MS = 30_000


@pytest.fixture
async def cluster(pg_pool: asyncpg.Pool) -> asyncpg.Pool:
    """A four-shard cluster on a fresh database."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
    return pg_pool


async def take(pool: asyncpg.Pool, number: int, owner: str) -> Lease:
    lease = await leases.acquire(pool, number, owner, TTL_MS, time.monotonic_ns() // 1_000_000)
    assert lease is not None
    return lease


async def test_entry_ids_of_a_shard_engine_carry_its_shard(cluster: asyncpg.Pool) -> None:
    """A shard engine's entry ids route back to its shard."""
    number = shard(ACCOUNT, SHARDS)
    lease = await take(cluster, number, "node-a")
    engine = await start_shard_engine(PgLog(cluster, number), lease.epoch, Settings(), clock=FakeClock())
    try:
        await engine.execute(cmd.Credit(ACCOUNT, "c1", CreditKind.MINT, 1_000))
        results = [await engine.execute(cmd.Reserve(ACCOUNT, f"r{i}", 10, ttl_s=60)) for i in range(20)]
    finally:
        await engine.close()
    ids = [r.entry.billing_entry_id for r in results if isinstance(r, EntryResult)]
    assert [number] * 20 == [shard_of_entry_id(entry_id, SHARDS) for entry_id in ids]


async def test_a_fenced_batch_stops_the_shard_and_writes_nothing(cluster: asyncpg.Pool) -> None:
    """After another owner takes the lease, the old engine's batch is refused, its caller told, the engine stopped."""
    number = shard(ACCOUNT, SHARDS)
    old = await take(cluster, number, "node-a")
    fenced: list[ShardFenced] = []
    engine = await start_shard_engine(PgLog(cluster, number), old.epoch, Settings(), on_fenced=fenced.append)
    await engine.execute(cmd.Credit(ACCOUNT, "c1", CreditKind.MINT, 1_000))
    assert await leases.release(cluster, old)
    new = await take(cluster, number, "node-b")
    with pytest.raises(ShardFenced):
        await engine.execute(cmd.Reserve(ACCOUNT, "r1", 10, ttl_s=60))
    with pytest.raises(EngineStopped):
        await engine.execute(cmd.Reserve(ACCOUNT, "r2", 10, ttl_s=60))
    await engine.abort()
    assert (1, old.epoch + 1, 1) == (len(fenced), new.epoch, await PgLog(cluster, number).last_seq())


async def test_recovery_folds_the_newest_snapshot_row_and_later_records(cluster: asyncpg.Pool) -> None:
    """A snapshot row plus the records after it recover exactly the state the engine had."""
    number = shard(ACCOUNT, SHARDS)
    lease = await take(cluster, number, "node-a")
    pg_log = PgLog(cluster, number)
    engine = await start_shard_engine(pg_log, lease.epoch, Settings(), clock=FakeClock())
    for i in range(5):
        await engine.execute(cmd.Credit(ACCOUNT, f"c{i}", CreditKind.MINT, 100))
    snapshot_seq = await engine.snapshot_now()
    await engine.execute(cmd.Reserve(ACCOUNT, "r1", 250, ttl_s=60))
    expected = engine.state.to_snapshot()
    await engine.abort()
    stored = await pg_log.load_newest()
    recovered = await recover_state(pg_log)
    assert (5, expected) == (stored.seq if stored else None, recovered.to_snapshot())
    assert 5 == snapshot_seq


async def test_a_refused_periodic_snapshot_row_is_logged_and_billing_goes_on(
    cluster: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL refusing a background snapshot row stops nothing: it is logged and tried an interval later."""
    number = shard(ACCOUNT, SHARDS)
    lease = await take(cluster, number, "node-a")
    engine = await start_shard_engine(PgLog(cluster, number), lease.epoch, Settings(snapshot_every_events=1))

    async def refused(*_: object, **__: object) -> bool:
        raise LogUnavailable("PostgreSQL went away")

    monkeypatch.setattr(PgLog, "write_snapshot", refused)
    try:
        await engine.execute(cmd.Credit(ACCOUNT, "c1", CreditKind.MINT, 1_000))
        while engine._snapshots.task is not None and not engine._snapshots.task.done():  # noqa: ASYNC110 - the private task is what we wait for
            await asyncio.sleep(0.01)
        after = await engine.execute(cmd.Credit(ACCOUNT, "c2", CreditKind.MINT, 1_000))
    finally:
        await engine.abort()
    assert isinstance(after, cmd.CreditResult)
    failures = {r.getMessage()[:15] for r in caplog.records if r.getMessage().startswith("snapshot failed")}
    assert {"snapshot failed"} == failures
