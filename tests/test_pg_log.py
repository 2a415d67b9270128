"""A shard's log in PostgreSQL: fenced, gapless, atomic batches of the file WAL's records (CLUSTER.md §2-3)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import events
from tollway.core import events as ev
from tollway.core.errors import InvalidInput, LogCorrupt, LogSequenceGap, LogUnavailable, ShardFenced
from tollway.pg import leases
from tollway.pg.leases import Lease
from tollway.pg.log import PgLog, StoredSnapshot
from tollway.pg.schema import init_cluster
from tollway.wal import codec

ENTRY_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
TTL_MS = 30_000


def make_events(first_seq: int, count: int, account_id: str = "acct-1") -> list[ev.Event]:
    return [
        ev.Event(seq, 1_767_225_600_000 + seq, ENTRY_ID, "untraced", ev.CreditMint(account_id, f"mint-{seq}", seq))
        for seq in range(first_seq, first_seq + count)
    ]


def records(batch: list[ev.Event]) -> list[bytes]:
    return [codec.encode(event) for event in batch]


async def take(pool: asyncpg.Pool, shard: int, owner: str = "node-a") -> Lease:
    lease = await leases.acquire(pool, shard, owner, TTL_MS, time.monotonic_ns() // 1_000_000)
    assert lease is not None
    return lease


async def row_count(pool: asyncpg.Pool, shard: int) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM tollway.events WHERE shard = $1", shard)
    return count


@pytest.fixture
async def cluster(pg_pool: asyncpg.Pool) -> asyncpg.Pool:
    """A four-shard cluster on a fresh database."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=4)
    return pg_pool


async def test_append_then_read_round_trips_events_and_bodies(cluster: asyncpg.Pool) -> None:
    """Events appended in batches read back equal, in order, with the file WAL's exact bodies."""
    lease = await take(cluster, 1)
    log = PgLog(cluster, 1)
    batches = [make_events(1, 3), make_events(4, 1), make_events(5, 128)]
    for batch in batches:
        await log.append(records(batch), batch[0].wal_sequence, lease.epoch)
    written = [event for batch in batches for event in batch]
    bodies = await cluster.fetch("SELECT body FROM tollway.events WHERE shard = 1 ORDER BY seq")
    assert written == await log.read(0, 1_000)
    assert written[10:15] == await log.read(10, 5)
    assert [] == await log.read(132, 10)
    assert [codec.encode_body(event) for event in written] == [bytes(row["body"]) for row in bodies]
    assert 132 == await log.last_seq()
    assert 0 == await PgLog(cluster, 2).last_seq()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(events, min_size=1, max_size=20))
async def test_any_event_round_trips(cluster: asyncpg.Pool, batch: list[ev.Event]) -> None:
    """Any event the codec can encode is stored and decoded back unchanged (sequences renumbered)."""
    log = PgLog(cluster, 3)
    start = await log.last_seq() + 1
    lease = (await leases.lease_rows(cluster))[3]
    if lease.owner is None:
        await take(cluster, 3)
    epoch = (await leases.lease_rows(cluster))[3].epoch
    renumbered = [
        ev.Event(start + n, e.timestamp_ms, e.billing_entry_id, e.correlation_id, e.payload)
        for n, e in enumerate(batch)
    ]
    await log.append(records(renumbered), start, epoch)
    assert renumbered == await log.read(start - 1, len(batch))


async def test_a_fenced_append_writes_nothing(cluster: asyncpg.Pool) -> None:
    """After another node takes the lease (new epoch), the old writer's batch is refused and writes nothing."""
    old = await take(cluster, 0, "node-a")
    log = PgLog(cluster, 0)
    await log.append(records(make_events(1, 2)), 1, old.epoch)
    await cluster.execute("UPDATE tollway.leases SET expires_at = now() - interval '1 second' WHERE shard = 0")
    new = await take(cluster, 0, "node-b")
    with pytest.raises(ShardFenced, match="epoch 2 held by node-b") as caught:
        await log.append(records(make_events(3, 5)), 3, old.epoch)
    assert (0, old.epoch) == (caught.value.shard, caught.value.epoch)
    assert (2, 2) == (await row_count(cluster, 0), await log.last_seq())
    await log.append(records(make_events(3, 5)), 3, new.epoch)
    assert [1] * 2 + [2] * 5 == [
        row["epoch"] for row in await cluster.fetch("SELECT epoch FROM tollway.events ORDER BY seq")
    ]


async def test_an_expired_lease_fences_even_with_no_new_owner(cluster: asyncpg.Pool) -> None:
    """A writer whose lease expired by PostgreSQL's clock writes nothing, though nobody took the shard."""
    lease = await take(cluster, 2)
    await cluster.execute("UPDATE tollway.leases SET expires_at = now() - interval '1 millisecond' WHERE shard = 2")
    with pytest.raises(ShardFenced, match="not live"):
        await PgLog(cluster, 2).append(records(make_events(1, 1)), 1, lease.epoch)
    assert 0 == await row_count(cluster, 2)


async def test_a_released_lease_fences(cluster: asyncpg.Pool) -> None:
    """After a graceful release the old epoch can no longer write."""
    lease = await take(cluster, 2)
    assert await leases.release(cluster, lease)
    with pytest.raises(ShardFenced):
        await PgLog(cluster, 2).append(records(make_events(1, 1)), 1, lease.epoch)
    assert 0 == await row_count(cluster, 2)


@pytest.mark.parametrize("first_seq", [1, 2, 4, 5])
async def test_sequence_gaps_and_overlaps_are_refused(cluster: asyncpg.Pool, first_seq: int) -> None:
    """A batch that does not start right after the last record (gap or overlap) is refused and writes nothing."""
    lease = await take(cluster, 1)
    log = PgLog(cluster, 1)
    await log.append(records(make_events(1, 2)), 1, lease.epoch)
    with pytest.raises(LogSequenceGap, match=f"must start at 3, not {first_seq}"):
        await log.append(records(make_events(first_seq, 2)), first_seq, lease.epoch)
    assert (2, 2) == (await row_count(cluster, 1), await log.last_seq())


async def test_a_failing_batch_leaves_no_row(cluster: asyncpg.Pool) -> None:
    """A batch whose insert fails part-way (a conflicting row) leaves none of its rows and last_seq unchanged."""
    lease = await take(cluster, 1)
    log = PgLog(cluster, 1)
    await log.append(records(make_events(1, 2)), 1, lease.epoch)
    stray = codec.encode_body(make_events(6, 1)[0])
    await cluster.execute("INSERT INTO tollway.events VALUES (1, 6, $1, 0, $2)", lease.epoch, stray)
    with pytest.raises(LogUnavailable, match="appending records 3…10"):
        await log.append(records(make_events(3, 8)), 3, lease.epoch)
    seqs = [row["seq"] for row in await cluster.fetch("SELECT seq FROM tollway.events WHERE shard = 1 ORDER BY seq")]
    assert ([1, 2, 6], 2) == (seqs, await log.last_seq())


async def test_shards_are_separate_logs(cluster: asyncpg.Pool) -> None:
    """Each shard has its own sequence from 1; one shard's lease does not let a node write another."""
    first, second = await take(cluster, 0), await take(cluster, 3)
    await PgLog(cluster, 0).append(records(make_events(1, 2, "a")), 1, first.epoch)
    await PgLog(cluster, 3).append(records(make_events(1, 3, "b")), 1, second.epoch)
    with pytest.raises(ShardFenced):
        await PgLog(cluster, 1).append(records(make_events(1, 1)), 1, first.epoch)
    assert (make_events(1, 2, "a"), make_events(1, 3, "b")) == (
        await PgLog(cluster, 0).read(0, 10),
        await PgLog(cluster, 3).read(0, 10),
    )


async def test_a_tampered_record_is_corrupt(cluster: asyncpg.Pool) -> None:
    """A body changed in the database fails its checksum on read, naming shard and sequence."""
    lease = await take(cluster, 0)
    log = PgLog(cluster, 0)
    await log.append(records(make_events(1, 3)), 1, lease.epoch)
    await cluster.execute(  # 'mint-2' becomes 'mint-X' (set_byte counts from 0, position from 1)
        "UPDATE tollway.events SET body = set_byte(body, position('mint-2'::bytea IN body) + 4, 88) WHERE seq = 2"
    )
    with pytest.raises(LogCorrupt, match="shard 0 sequence 2: checksum mismatch"):
        await log.read(0, 10)


async def test_malformed_records_and_batch_sizes_are_refused(cluster: asyncpg.Pool) -> None:
    """An empty batch or a record whose frame length is wrong is refused before PostgreSQL sees it."""
    lease = await take(cluster, 0)
    log = PgLog(cluster, 0)
    with pytest.raises(InvalidInput):
        await log.append([], 1, lease.epoch)
    with pytest.raises(InvalidInput, match="frame says"):
        await log.append([codec.encode(make_events(1, 1)[0]) + b"x"], 1, lease.epoch)
    assert 0 == await row_count(cluster, 0)


async def test_snapshots_round_trip_and_are_fenced(cluster: asyncpg.Pool) -> None:
    """Snapshots store and load by sequence; a stale epoch or a sequence past the log's end is refused."""
    lease = await take(cluster, 1)
    log = PgLog(cluster, 1)
    assert await log.load_newest() is None
    await log.append(records(make_events(1, 5)), 1, lease.epoch)
    assert await log.write_snapshot(0, b"empty", epoch=lease.epoch)
    assert await log.write_snapshot(3, b"three", epoch=lease.epoch)
    assert not await log.write_snapshot(3, b"three", epoch=lease.epoch)
    with pytest.raises(ShardFenced):
        await log.write_snapshot(6, b"beyond the log", epoch=lease.epoch)
    with pytest.raises(ShardFenced):
        await log.write_snapshot(5, b"stale", epoch=lease.epoch + 1)
    assert StoredSnapshot(3, b"three") == await log.load_newest()
    assert StoredSnapshot(0, b"empty") == await log.load_newest(max_seq=2)
    assert await PgLog(cluster, 2).load_newest() is None


async def test_a_new_owner_sees_every_batch_the_old_owner_was_acknowledged(cluster: asyncpg.Pool) -> None:
    """Appends racing a takeover: each is acknowledged before the new epoch (and within its last_seq) or fenced."""
    old = await leases.acquire(cluster, 2, "node-a", 500, time.monotonic_ns() // 1_000_000)
    assert old is not None
    log = PgLog(cluster, 2)
    await log.append(records(make_events(1, 4)), 1, old.epoch)  # at least one batch before the race
    acknowledged = [4]

    async def old_writer() -> None:
        seq = 5
        while True:
            try:
                await log.append(records(make_events(seq, 4)), seq, old.epoch)
            except ShardFenced:
                return
            acknowledged.append(seq + 3)
            seq += 4

    writer = asyncio.create_task(old_writer())
    poll_ms = time.monotonic_ns() // 1_000_000
    # polling PostgreSQL is the point: its clock, not ours, says when the lease is free
    while (new := await leases.acquire(cluster, 2, "node-b", TTL_MS, poll_ms)) is None:
        await asyncio.sleep(0.005)
        poll_ms = time.monotonic_ns() // 1_000_000
    await asyncio.wait_for(writer, 10)
    assert (acknowledged[-1], acknowledged[-1]) == (new.last_seq, await row_count(cluster, 2))


async def test_pruning_keeps_the_newest_snapshots_and_is_fenced(cluster: asyncpg.Pool) -> None:
    """prune_snapshots deletes all but the newest ones, never events; a stale epoch deletes nothing."""
    lease = await take(cluster, 1)
    log = PgLog(cluster, 1)
    await log.append(records(make_events(1, 9)), 1, lease.epoch)
    for seq in (0, 3, 6, 9):
        assert await log.write_snapshot(seq, f"after {seq}".encode(), epoch=lease.epoch)
    assert 0 == await log.prune_snapshots(2, epoch=lease.epoch + 1)
    assert 2 == await log.prune_snapshots(2, epoch=lease.epoch)
    assert 0 == await log.prune_snapshots(2, epoch=lease.epoch)
    seqs = [row["seq"] for row in await cluster.fetch("SELECT seq FROM tollway.snapshots ORDER BY seq")]
    assert ([6, 9], StoredSnapshot(9, b"after 9"), 9) == (seqs, await log.load_newest(), await row_count(cluster, 1))
