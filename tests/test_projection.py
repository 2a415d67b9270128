"""The Redis projection against a real redis-server: parity, idempotency, rebuild, outages (SPEC §7)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from tollway import Engine, Settings
from tollway.config import Durability
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.state import State
from tollway.housekeeping import sweep_once
from tollway.redis import projector as projector_module
from tollway.redis.keys import Keys
from tollway.redis.parity import differences
from tollway.redis.projection import HSET_ARGS_MAX, OPCODES, Batch, encode_batch, entry_fields
from tollway.redis.projector import Projector, load_script
from tollway.redis.server import EmbeddedRedis
from tollway.testing import FakeClock
from tollway.wal.segments import iter_events

KEYS = Keys("tw", "t1")
OWNER = "0123456789abcdef0123456789abcdef"  # the identity of a data directory that writes


@dataclass
class Rig:
    engine: Engine
    projector: Projector
    client: aioredis.Redis
    server: EmbeddedRedis
    clock: FakeClock


@pytest.fixture
async def rig(tmp_path: Path, redis_server: EmbeddedRedis, clock: FakeClock) -> AsyncIterator[Rig]:
    """An engine in settlement mode, a projector, and a client on a private redis-server."""
    settings = Settings(data_dir=tmp_path / "data", settlement_url="http://settlement.invalid")
    client = aioredis.Redis.from_url(redis_server.url)
    async with Engine.open(settings=settings, clock=clock) as engine:
        projector = Projector(engine, client, KEYS, batch_events_max=7)
        try:
            yield Rig(engine, projector, client, redis_server, clock)
        finally:
            await client.aclose()


async def workload(engine: Engine, clock: FakeClock, seed: int, steps: int) -> None:
    """Random billing traffic: mints, holds, commits (some over), releases, expiries, settlement outcomes."""
    rng = random.Random(seed)
    accounts = ["alice", "bob", "carol"]
    for account in accounts:
        await engine.execute(cmd.Credit(account, "initial", CreditKind.MINT, 50_000))
    for step in range(steps):
        ids = sorted(engine.state.entries)
        target = rng.choice(ids) if ids else "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        roll = rng.random()
        command: cmd.Command
        if roll < 0.35:
            command = cmd.Reserve(rng.choice(accounts), f"r{step}", rng.randint(0, 3_000), ttl_s=rng.randint(1, 20))
        elif roll < 0.6:
            response = '{"ok": true}' if rng.random() < 0.3 else None
            command = cmd.Commit(target, rng.randint(0, 4_000), response_json=response)
        elif roll < 0.68:
            command = cmd.Release(target, "user_cancel")
        elif roll < 0.78:
            command = cmd.FinalizeAck(target)
        elif roll < 0.86:
            command = cmd.FinalizeFail(target, "gave up", 5)
        elif roll < 0.9:
            command = cmd.Void(target, "refund", "admin")
        elif roll < 0.95:
            command = cmd.Charge(rng.choice(accounts), f"c{step}", rng.randint(1, 500), allow_partial=True)
        else:
            clock.advance(rng.randint(1_000, 15_000))
            await sweep_once(engine)
            continue
        await engine.execute(command)


async def dump(client: aioredis.Redis) -> dict[bytes, object]:
    """Every key of the server with its type and value, for before/after comparisons."""
    out: dict[bytes, object] = {}
    async for key in client.scan_iter(count=1000):
        kind = await client.type(key)
        if kind == b"hash":
            out[key] = await client.hgetall(key)
        elif kind == b"zset":
            out[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            out[key] = await client.xrange(key)
        else:
            out[key] = await client.get(key)
    return out


@pytest.mark.parametrize("batch_events_max", [1, 7, 1000])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_parity_after_random_workload(rig: Rig, seed: int, batch_events_max: int) -> None:
    """After random traffic every Redis balance, entry, index and queue equals the engine's state.

    The projection starts empty and is then fed batches of 1 event (no folding), 7, or every
    event at once (holds committed, released, voided or settled within their batch).
    """
    rig.projector.batch_events_max = batch_events_max
    await rig.projector.sync()  # the empty projection, so that every event below arrives in a batch
    await workload(rig.engine, rig.clock, seed, 150)
    await rig.projector.sync()
    assert [] == await differences(rig.client, KEYS, rig.engine.state)
    assert rig.engine.durable_sequence == rig.projector.applied_seq
    assert 1 == rig.projector.rebuilds


RATE = ev.RateSnapshot(100, 1_000_000, 0)
HOLD = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def folded(batch: Batch) -> list[list[object]]:
    """The ops a batch carries (money first), with each op's (first) key index turned back into its name."""
    first, last, money, rest = msgspec.msgpack.decode(batch.argv[0])
    assert (batch.first_seq, batch.last_seq) == (first, last)
    assert {"I", "C"} >= {op[0] for op in money}
    assert not {"I", "C"} & {op[0] for op in rest}
    return [[op[0], batch.keys[op[1] - 1], *op[2:]] for op in [*money, *rest]]


def test_a_batch_carries_the_net_effect_of_a_hold_and_its_commit() -> None:
    """No HSET of a hold settled in its batch, the ZADD cancelled by the commit's ZREM, one HINCRBY per moved field."""
    events = [
        ev.Event(1, 0, "01ARZ3NDEKTSV4RRFFQ69G5FAA", "x", ev.CreditMint("alice", "m", 1_000)),
        ev.Event(2, 5, HOLD, "x", ev.BillingReserve("alice", "r", 300, 60_000, RATE, "f")),
        ev.Event(3, 9, HOLD, "x", ev.BillingCommit("alice", 300, 120, 120, 0, "cap", False, RATE)),
    ]
    ops = folded(encode_batch(KEYS, events, OWNER))
    assert ["C", "C", "D", "I", "I", "N", "R"] == sorted(str(op[0]) for op in ops)
    alice = KEYS.account("alice")
    assert ["I", alice, "available", "0", "880", 1] in ops  # +1000 -300 +180: never below the start
    assert ["I", alice, "charged", "0", "120", 3] in ops  # held: +300 -300, nothing to do
    assert ["N", KEYS.counters, "COMMITTED", "1"] in ops
    assert ["D", KEYS.entry(HOLD)] in ops  # settled within the batch: its hash is never written


async def test_an_entry_written_many_times_in_one_batch_is_one_short_hset(rig: Rig) -> None:
    """Hundreds of extensions of one hold in a batch: its HSET keeps each field once, and applies."""
    await rig.engine.execute(cmd.Credit("alice", "m", CreditKind.MINT, 1_000))
    hold = await rig.engine.execute(cmd.Reserve("alice", "r", 100, ttl_s=30))
    assert isinstance(hold, EntryResult)
    await rig.projector.sync()
    for ttl in range(31, 331):
        await rig.engine.execute(cmd.Extend(hold.entry.billing_entry_id, ttl))
    events = list(iter_events(rig.engine.settings.wal_dir))[-300:]
    batch = encode_batch(KEYS, events, rig.projector.owner)
    (entry,) = [op for op in folded(batch) if op[0] == "H"]
    assert len(entry) <= HSET_ARGS_MAX + 2
    reply = await rig.client.register_script(load_script("apply_batch.lua"))(keys=batch.keys, args=batch.argv)
    assert b"ok" == reply[0]
    assert [] == await differences(rig.client, KEYS, rig.engine.state)


async def test_a_balance_that_dips_below_zero_inside_a_batch_is_refused(rig: Rig) -> None:
    """The low point is checked, not only the end: a hold before the mint that pays for it is a violation."""
    await rig.projector.sync()
    before = await dump(rig.client)
    seq = rig.engine.durable_sequence
    first = ev.Event(seq + 1, 0, "01ARZ3NDEKTSV4RRFFQ69G5FAA", "x", ev.CreditMint("alice", "m1", 100))
    dip = ev.Event(seq + 2, 0, HOLD, "x", ev.BillingReserve("alice", "r", 500, 9, RATE, "f"))
    mint = ev.Event(seq + 3, 0, "01ARZ3NDEKTSV4RRFFQ69G5FAW", "x", ev.CreditMint("alice", "m2", 10_000))
    batch = encode_batch(KEYS, [first, dip, mint], rig.projector.owner)
    # +100, -500 (the low point: -400, at the hold), +10,000: ends at 9,600
    assert ["I", KEYS.account("alice"), "available", "-400", "10000", seq + 2] in folded(batch)
    reply = await rig.client.register_script(load_script("apply_batch.lua"))(keys=batch.keys, args=batch.argv)
    assert [b"violation", str(seq + 2).encode(), KEYS.account("alice").encode(), b"available"] == reply[:4]
    assert before == await dump(rig.client)


async def test_a_batch_overlapping_the_applied_sequence_is_a_gap(rig: Rig) -> None:
    """Its events cannot be applied in part (they are folded): nothing changes, the projector re-reads."""
    await rig.engine.execute(cmd.Credit("alice", "m", CreditKind.MINT, 100))
    await rig.engine.execute(cmd.Credit("alice", "n", CreditKind.MINT, 100))
    events = list(iter_events(rig.engine.settings.wal_dir))
    await rig.projector.sync()
    await rig.engine.execute(cmd.Credit("alice", "o", CreditKind.MINT, 100))
    before = await dump(rig.client)
    batch = encode_batch(
        KEYS, [*events[-1:], *list(iter_events(rig.engine.settings.wal_dir))[-1:]], rig.projector.owner
    )
    reply = await rig.client.register_script(load_script("apply_batch.lua"))(keys=batch.keys, args=batch.argv)
    applied = str(rig.engine.durable_sequence - 1).encode()
    assert [b"gap", applied, str(events[-1].wal_sequence).encode()] == reply
    assert before == await dump(rig.client)
    await rig.projector.sync()
    assert [] == await differences(rig.client, KEYS, rig.engine.state)


async def test_applying_the_same_batch_twice_changes_nothing(rig: Rig) -> None:
    """A batch at or below applied_seq is a duplicate: the second application is a no-op."""
    await workload(rig.engine, rig.clock, 4, 40)
    await rig.projector.sync()
    before = await dump(rig.client)
    events = list(iter_events(rig.engine.settings.wal_dir))
    batch = encode_batch(KEYS, events[-10:], rig.projector.owner)
    script = rig.client.register_script(load_script("apply_batch.lua"))
    reply = await script(keys=batch.keys, args=batch.argv)
    assert [b"duplicate", str(events[-1].wal_sequence).encode()] == reply
    assert before == await dump(rig.client)


async def test_a_batch_that_would_overdraw_is_refused_whole(rig: Rig) -> None:
    """The script re-checks non-negativity: a violating batch reports and applies nothing."""
    await rig.engine.execute(cmd.Credit("alice", "m", CreditKind.MINT, 100))
    await rig.projector.sync()
    before = await dump(rig.client)
    seq = rig.engine.durable_sequence
    rate = ev.RateSnapshot(100, 1_000_000, 0)
    good = ev.Event(seq + 1, 0, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "x", ev.CreditMint("bob", "m", 10))
    bad = ev.Event(seq + 2, 0, "01ARZ3NDEKTSV4RRFFQ69G5FAW", "x", ev.BillingReserve("alice", "r", 500, 9, rate, "f"))
    batch = encode_batch(KEYS, [good, bad], rig.projector.owner)
    script = rig.client.register_script(load_script("apply_batch.lua"))
    reply = await script(keys=batch.keys, args=batch.argv)
    assert [b"violation", str(seq + 2).encode(), KEYS.account("alice").encode(), b"available"] == reply[:4]
    assert before == await dump(rig.client)


async def test_gap_is_reported_not_applied(rig: Rig) -> None:
    """A batch that does not continue the projection is refused with the applied sequence."""
    await rig.engine.execute(cmd.Credit("alice", "m", CreditKind.MINT, 100))
    await rig.projector.sync()
    seq = rig.engine.durable_sequence
    event = ev.Event(seq + 5, 0, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "x", ev.CreditMint("bob", "m", 10))
    batch = encode_batch(KEYS, [event], rig.projector.owner)
    reply = await rig.client.register_script(load_script("apply_batch.lua"))(keys=batch.keys, args=batch.argv)
    assert [b"gap", str(seq).encode(), str(seq + 5).encode()] == reply


async def test_flushall_midrun_rebuilds_everything_including_queues(rig: Rig) -> None:
    """After FLUSHALL the projector rebuilds balances, entries and both queues exactly."""
    await workload(rig.engine, rig.clock, 5, 120)
    await rig.projector.sync()
    rebuilds = rig.projector.rebuilds  # a brand-new Redis is rebuilt too
    await rig.client.flushall()
    await workload(rig.engine, rig.clock, 6, 60)
    await rig.projector.sync()
    assert rebuilds + 1 == rig.projector.rebuilds
    assert [] == await differences(rig.client, KEYS, rig.engine.state)
    assert any(e.state.value == "FINALIZE_FAILED" for e in rig.engine.state.entries.values())
    assert any(e.state.value == "FINALIZE_PENDING" for e in rig.engine.state.entries.values())


async def test_projection_ahead_of_the_log_is_rebuilt(rig: Rig) -> None:
    """An applied_seq beyond the durable WAL (Redis kept what the log lost) forces a rebuild."""
    await workload(rig.engine, rig.clock, 7, 30)
    await rig.projector.sync()
    await rig.client.hset(KEYS.meta, "applied_seq", str(rig.engine.durable_sequence + 100))
    await rig.client.hset(KEYS.account("ghost"), "available", "999")
    await rig.projector.sync()
    assert [] == await differences(rig.client, KEYS, rig.engine.state)
    assert 0 == await rig.client.exists(KEYS.account("ghost"))


async def test_catch_up_from_the_wal_when_the_buffer_is_gone(rig: Rig) -> None:
    """Events no longer in memory are read back from the WAL files."""
    await workload(rig.engine, rig.clock, 8, 50)
    await rig.projector.sync()
    await workload(rig.engine, rig.clock, 9, 80)
    rig.projector._buffer.clear()  # as if the bounded buffer had dropped them during an outage
    await rig.projector.sync()
    assert [] == await differences(rig.client, KEYS, rig.engine.state)


async def test_redis_killed_and_restarted_under_load(rig: Rig) -> None:
    """Billing never stops while Redis is down; the projection catches up when it returns."""
    task = asyncio.create_task(rig.projector.run())
    try:
        await workload(rig.engine, rig.clock, 10, 40)
        rig.server.kill()
        await workload(rig.engine, rig.clock, 11, 80)  # billing continues without Redis
        assert not rig.projector.connected or rig.projector.applied_seq != rig.engine.durable_sequence
        await rig.server.restart()
        for _ in range(400):
            if rig.projector.connected and rig.projector.applied_seq == rig.engine.durable_sequence:
                break
            await asyncio.sleep(0.01)
        assert rig.engine.durable_sequence == rig.projector.applied_seq
        assert [] == await differences(rig.client, KEYS, rig.engine.state)
        assert 1 <= rig.projector.rebuilds  # the restarted server was empty
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_billing_results_do_not_wait_for_redis(tmp_path: Path, clock: FakeClock) -> None:
    """With the projector unable to reach Redis at all, commands still complete."""
    settings = Settings(data_dir=tmp_path / "data", durability=Durability.FSYNC)
    client = aioredis.Redis.from_url(f"unix://{tmp_path}/nowhere.sock")
    try:
        async with Engine.open(settings=settings, clock=clock) as engine:
            projector = Projector(engine, client, KEYS)
            task = asyncio.create_task(projector.run())
            await engine.execute(cmd.Credit("a", "m", CreditKind.MINT, 10))
            result = await engine.execute(cmd.Reserve("a", "r", 5))
            assert isinstance(result, EntryResult)
            assert not projector.connected
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await client.aclose()


@pytest.mark.parametrize("swallowed_as", ["connection_error", "normal_return"])
async def test_projector_stops_even_if_the_client_swallows_cancellation(rig: Rig, swallowed_as: str) -> None:
    """A cancellation the Redis client turns into a ConnectionError, or into a normal return, still stops it."""
    entered = asyncio.Event()

    async def swallowing_sync() -> int:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if swallowed_as == "connection_error":
                raise redis.exceptions.ConnectionError("connection lost while cancelled") from None
        rig.projector.applied_seq = rig.engine.durable_sequence
        return rig.engine.durable_sequence

    rig.projector.sync = swallowing_sync  # type: ignore[method-assign]
    task = asyncio.create_task(rig.projector.run())
    await entered.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert {task} == done
    assert task.cancelled()


async def test_catch_up_when_the_buffer_kept_only_the_newest_events(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the bounded buffer dropped its oldest events, the WAL fills the gap without repeating any."""
    monkeypatch.setattr(projector_module, "WAL_READ_EVENTS_MAX", 10)  # far behind: several WAL reads
    await workload(rig.engine, rig.clock, 12, 20)
    await rig.projector.sync()
    await workload(rig.engine, rig.clock, 13, 120)
    for _ in range(len(rig.projector._buffer) // 2):  # as on overflow: the oldest half is gone
        rig.projector._buffer.popleft()
    async with asyncio.timeout(10):
        await rig.projector.sync()
    assert rig.engine.durable_sequence == rig.projector.applied_seq
    assert [] == await differences(rig.client, KEYS, rig.engine.state)


async def evalsha_calls(client: aioredis.Redis) -> int:
    """How many EVALSHA calls the server has executed (INFO commandstats)."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.parametrize("coalesce_ms", [0, 200])
async def test_a_caught_up_projector_gathers_batches_for_coalesce_ms(rig: Rig, coalesce_ms: int) -> None:
    """Ten commands made durable one by one: one call per batch without coalescing, far fewer with it."""
    projector = Projector(rig.engine, rig.client, KEYS, coalesce_ms=coalesce_ms)
    await rig.engine.execute(cmd.Credit("a", "m", CreditKind.MINT, 1_000))
    await projector.sync()
    task = asyncio.create_task(projector.run())
    try:
        await asyncio.sleep(0.05)  # the projector is caught up and waiting
        before = await evalsha_calls(rig.client)
        for number in range(10):
            await rig.engine.execute(cmd.Reserve("a", f"r{number}", 10))  # its own durable batch
            await asyncio.sleep(0.005)
        for _ in range(200):
            if projector.applied_seq == rig.engine.durable_sequence:
                break
            await asyncio.sleep(0.01)
        calls = await evalsha_calls(rig.client) - before
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rig.engine.durable_sequence == projector.applied_seq
    assert [] == await differences(rig.client, KEYS, rig.engine.state)
    if coalesce_ms:
        assert calls <= 2
    else:
        assert calls >= 5


@contextlib.asynccontextmanager
async def projecting(rig: Rig) -> AsyncIterator[asyncio.Task[None]]:
    """The projector's run() as a task for the block; cancelled (and seen to stop) after it."""
    task = asyncio.create_task(rig.projector.run())
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def caught_up(rig: Rig) -> None:
    """Wait (at most 10 s) until the running projector applied every durable event; then check parity."""
    for _ in range(1000):
        if rig.projector.applied_seq == rig.engine.durable_sequence:
            break
        await asyncio.sleep(0.01)
    assert rig.engine.durable_sequence == rig.projector.applied_seq
    assert [] == await differences(rig.client, KEYS, rig.engine.state)


async def pauses_while_redis_refuses_writes(rig: Rig, *, flushed: bool) -> None:
    """Redis at maxmemory takes no batch (nor a rebuild, if ``flushed``); billing goes on, the projection resumes."""
    await rig.projector.sync()
    await workload(rig.engine, rig.clock, 14, 30)
    await rig.projector.sync()
    if flushed:
        await rig.client.flushall()  # the next sync rebuilds, with plain commands
    await rig.client.config_set("maxmemory", "1")  # every write that may grow memory is refused now
    async with projecting(rig) as task:
        await workload(rig.engine, rig.clock, 15, 60)  # billing goes on
        await asyncio.sleep(0.3)
        assert rig.projector.violation is None
        assert not task.done()
        assert rig.projector.applied_seq is not None
        assert rig.projector.applied_seq < rig.engine.durable_sequence
        assert "maxmemory" in (rig.projector.status().redis_error or "")
        await rig.client.config_set("maxmemory", "0")
        await caught_up(rig)
        assert rig.projector.status().redis_error is None


@pytest.mark.parametrize("flushed", [False, True])
async def test_a_full_redis_pauses_the_projection_and_is_not_a_violation(rig: Rig, flushed: bool) -> None:
    """A full Redis is an outage, not a conservation violation (which would stop new holds until an admin reset)."""
    await pauses_while_redis_refuses_writes(rig, flushed=flushed)


async def test_any_error_answer_pauses_the_projection_instead_of_ending_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error Redis answers to a rebuild (here MISCONF: it cannot persist) is waited out, not fatal."""
    real_rebuild = rig.projector.rebuild
    answers = iter([redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots")])

    async def rebuild_once_refused() -> int:
        for error in answers:
            raise error
        return await real_rebuild()

    monkeypatch.setattr(rig.projector, "rebuild", rebuild_once_refused)
    await rig.engine.execute(cmd.Credit("alice", "m", CreditKind.MINT, 100))
    async with projecting(rig) as task:
        await caught_up(rig)
        assert not task.done()
        assert rig.projector.status().redis_error is None


@pytest.mark.parametrize("money", [True, False])
async def test_a_full_redis_answers_the_script_unwritable(rig: Rig, money: bool) -> None:
    """Whether the batch's first write is a balance or an entry hash, the script says so and changes nothing."""
    await rig.engine.execute(cmd.Credit("alice", "m", CreditKind.MINT, 1_000))
    hold = await rig.engine.execute(cmd.Reserve("alice", "r", 100, ttl_s=30))
    assert isinstance(hold, EntryResult)
    await rig.projector.sync()
    command: cmd.Command = (
        cmd.Release(hold.entry.billing_entry_id, "user_cancel")
        if money
        else cmd.Extend(hold.entry.billing_entry_id, 60)
    )
    await rig.engine.execute(command)
    events = list(iter_events(rig.engine.settings.wal_dir))
    batch = encode_batch(KEYS, events[-1:], rig.projector.owner)
    before = await dump(rig.client)
    await rig.client.config_set("maxmemory", "1")
    try:
        reply = await rig.client.register_script(load_script("apply_batch.lua"))(keys=batch.keys, args=batch.argv)
    finally:
        await rig.client.config_set("maxmemory", "0")
    assert b"unwritable" == reply[0]
    assert before == await dump(rig.client)


def _without_stream_ids(dumped: dict[bytes, object]) -> dict[bytes, object]:
    """A dump with the parts that carry Redis-made stream ids left out (messages keep their fields)."""
    out: dict[bytes, object] = {}
    for key, value in dumped.items():
        if isinstance(value, dict):
            out[key] = {field: item for field, item in value.items() if field != b"poison_id"}
        elif isinstance(value, list) and value and isinstance(value[0], tuple) and isinstance(value[0][1], dict):
            out[key] = [fields for _, fields in value]
        else:
            out[key] = value
    return out


async def test_any_split_into_batches_leaves_redis_the_same(rig: Rig) -> None:
    """The folded batches of any split of the log leave Redis exactly as applying the events one by one."""
    await workload(rig.engine, rig.clock, 21, 200)
    events = list(iter_events(rig.engine.settings.wal_dir))
    script = rig.client.register_script(load_script("apply_batch.lua"))

    async def project(sizes: list[int]) -> dict[bytes, object]:
        await rig.client.flushall()
        await rig.client.hset(KEYS.meta, mapping={"applied_seq": "0", "owner": rig.projector.owner})
        start = 0
        for size in itertools.cycle(sizes):
            if start >= len(events):
                break
            batch = encode_batch(KEYS, events[start : start + size], rig.projector.owner)
            assert b"ok" == (await script(keys=batch.keys, args=batch.argv))[0]
            start += size
        return _without_stream_ids(await dump(rig.client))

    one_by_one = await project([1])
    rng = random.Random(5)
    for _ in range(12):
        sizes = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
        assert one_by_one == await project(sizes), sizes
    assert one_by_one == await project([len(events)])


ENTRY_A, ENTRY_B, ENTRY_C, ENTRY_D = (f"01ARZ3NDEKTSV4RRFFQ69G5FB{letter}" for letter in "ABCD")
CUTOFF_MS = 1_500_000_000_000  # after the time part of these ids (2016-07-30): they were made before it


def archive_events() -> list[ev.Event]:
    """A commit with a stored response (A), a release (B), a hold left alone (C), then A, B and the mint archived."""

    def event(seq: int, entry_id: str, payload: ev.Payload) -> ev.Event:
        return ev.Event(seq, seq * 10, entry_id, f"c{seq}", payload)

    return [
        event(1, "01ARZ3NDEKTSV4RRFFQ69G5FAA", ev.CreditMint("alice", "m", 10_000)),
        event(2, ENTRY_A, ev.BillingReserve("alice", "ra", 300, 60_000, RATE, "f")),
        event(3, ENTRY_A, ev.BillingCommit("alice", 300, 120, 120, 0, "cap", False, RATE)),
        event(4, ENTRY_A, ev.RequestComplete("alice", "ra", '{"ok": true}')),
        event(5, ENTRY_B, ev.BillingReserve("alice", "rb", 200, 60_000, RATE, "f")),
        event(6, ENTRY_B, ev.BillingRelease("alice", 200, "user_cancel")),
        event(7, ENTRY_C, ev.BillingReserve("alice", "rc", 100, 60_000, RATE, "f")),
        event(
            8,
            "01ARZ3NDEKTSV4RRFFQ69G5FAB",
            ev.EntriesArchived(
                1_000,
                (
                    ev.ArchivedEntry(ENTRY_A, "alice", "ra", "COMMITTED"),
                    ev.ArchivedEntry(ENTRY_B, "alice", "rb", "RELEASED"),
                ),
                (ev.ArchivedCredit("alice", "m", "01ARZ3NDEKTSV4RRFFQ69G5FAA"),),  # Redis holds no credit records
            ),
        ),
    ]


def test_entries_created_and_archived_in_one_batch_are_only_deleted() -> None:
    """Created, settled, answered and archived in one batch: DELs of their keys, no HSET or SET, counts net out."""
    ops = folded(encode_batch(KEYS, [event for event in archive_events() if event.billing_entry_id != ENTRY_C], OWNER))
    assert not [op for op in ops if op[0] in ("H", "S", "N")]  # RESERVE_HELD, COMMITTED, RELEASED: +1 -1 each
    deletes = [op for op in ops if op[0] == "D"]
    expected = [KEYS.entry(ENTRY_A), KEYS.response(ENTRY_A), KEYS.entry(ENTRY_B), KEYS.response(ENTRY_B)]
    assert sorted(expected) == sorted(str(op[1]) for op in deletes)
    assert deletes == ops[-4:]  # after everything else
    alice = KEYS.account("alice")
    assert ["I", alice, "available", "0", "9880", 1] in ops  # the archive moved no money
    assert ["I", alice, "charged", "0", "120", 3] in ops


def test_an_archived_entry_written_again_in_the_batch_is_refused() -> None:
    """Entry ids are never reused: a hash written after its entry was archived is a broken log, not a fold."""
    events = archive_events()
    again = ev.Event(9, 90, ENTRY_A, "x", ev.BillingReserve("alice", "ra2", 1, 60_000, RATE, "f"))
    with pytest.raises(ValueError, match="deleted"):
        encode_batch(KEYS, [*events, again], OWNER)


async def project_events(client: aioredis.Redis, events: list[ev.Event], sizes: list[int]) -> None:
    """Apply ``events`` to an empty projection in batches of ``sizes`` (the last size repeated)."""
    await client.hset(KEYS.meta, mapping={"applied_seq": "0", "owner": OWNER})
    script = client.register_script(load_script("apply_batch.lua"))
    start = 0
    for size in itertools.chain(sizes, itertools.repeat(sizes[-1])):
        if start >= len(events):
            break
        batch = encode_batch(KEYS, events[start : start + size], OWNER)
        assert b"ok" == (await script(keys=batch.keys, args=batch.argv))[0]
        start += size


def folded_state(events: list[ev.Event]) -> State:
    """The engine's state after ``events`` (from the first sequence)."""
    state = State()
    for event in events:
        state.apply(event)
    return state


@pytest.mark.parametrize("sizes", [[1], [7, 1], [8]], ids=["one_by_one", "archive_apart", "one_batch"])
async def test_archived_entries_leave_the_projection(redis_client: aioredis.Redis, sizes: list[int]) -> None:
    """Their hashes and stored response are deleted, the live hold and every balance stay, and parity holds."""
    events = archive_events()
    await project_events(redis_client, events, sizes)
    state = folded_state(events)
    assert ([ENTRY_C], {}) == (list(state.entries), state.credits)
    for key in (KEYS.entry(ENTRY_A), KEYS.response(ENTRY_A), KEYS.entry(ENTRY_B), KEYS.response(ENTRY_B)):
        assert 0 == await redis_client.exists(key)
    held = {k.encode(): v.encode() for k, v in entry_fields(state.entries[ENTRY_C]).items()}
    assert held == await redis_client.hgetall(KEYS.entry(ENTRY_C))
    balances = {b"available": b"9780", b"held": b"100", b"charged": b"120"}
    assert balances == {k: v for k, v in (await redis_client.hgetall(KEYS.account("alice"))).items() if v != b"0"}
    assert {b"revenue": b"120", b"funding": b"-10000"} == await redis_client.hgetall(KEYS.ledger)
    counts = {k: v for k, v in (await redis_client.hgetall(KEYS.counters)).items() if v != b"0"}
    assert {b"RESERVE_HELD": b"1"} == counts  # a count back to 0 may stay as "0" (one by one)
    assert [ENTRY_C.encode()] == await redis_client.zrange(KEYS.expiry, 0, -1)
    assert [] == await differences(redis_client, KEYS, state)


@pytest.mark.parametrize("ending", ["void", "ack"])
@pytest.mark.parametrize(
    "sizes", [[1], [5, 1], [4, 2], [6]], ids=["one_by_one", "archive_apart", "settled_with_archive", "one_batch"]
)
async def test_a_dead_letter_settled_then_archived_leaves_no_letter(
    redis_client: aioredis.Redis, sizes: list[int], ending: str
) -> None:
    """The void's (or ack's) XDEL of the letter reads the entry's poison_id before the archive deletes the hash."""

    def event(seq: int, payload: ev.Payload) -> ev.Event:
        return ev.Event(seq, seq * 10, ENTRY_D if seq > 1 else "01ARZ3NDEKTSV4RRFFQ69G5FAA", f"c{seq}", payload)

    final = "VOIDED" if ending == "void" else "FINALIZE_ACKED"
    events = [
        event(1, ev.CreditMint("alice", "m", 1_000)),
        event(2, ev.BillingCharge("alice", "rd", 50, 50, False, True, RATE, "f")),
        event(3, ev.RequestComplete("alice", "rd", '{"ok": true}')),
        event(4, ev.BillingFinalizeFail("alice", 50, "gave up", 5)),
        event(5, ev.BillingVoid("alice", 50, "refund", "admin", "FINALIZE_FAILED"))
        if ending == "void"
        else event(5, ev.BillingFinalizeAck("alice", 50, "admin", 6, "FINALIZE_FAILED")),
        event(6, ev.EntriesArchived(CUTOFF_MS, (ev.ArchivedEntry(ENTRY_D, "alice", "rd", final),))),
    ]
    await project_events(redis_client, events, sizes)
    assert [] == await redis_client.xrange(KEYS.poison)
    assert 0 == await redis_client.exists(KEYS.entry(ENTRY_D), KEYS.response(ENTRY_D))
    assert 1 == await redis_client.xlen(KEYS.finalize)  # the charge's message: no worker finished it here
    state = folded_state(events)
    assert [] == await differences(redis_client, KEYS, state)  # stale: its entry was made before the cutoff
    stranger = {"billing_entry_id": "01ARZ3NDEKTSV4RRFFQ69G5FBZ".replace("01ARZ3NDEK", "7ZZZZZZZZZ")}
    await redis_client.xadd(KEYS.finalize, stranger)  # type: ignore[arg-type]
    problems = await differences(redis_client, KEYS, state)
    assert ["finalize queue: 0 pending entries not queued [], 1 extra ['7ZZZZZZZZZTSV4RRFFQ69G5FBZ']"] == problems


def test_the_opcodes_named_in_python_are_the_ones_the_script_documents_and_runs() -> None:
    """OPCODES matches apply_batch.lua's header, and the script's body handles every one of them."""
    script = load_script("apply_batch.lua")
    header = script[script.index("-- Opcodes:") : script.index("-- Returns")]
    documented = {line[5] for line in header.splitlines() if line.startswith("--   ") and line[5:6].isupper()}
    body = script[script.index("local meta = KEYS[1]") :]
    handled = {code for code in OPCODES if f"'{code}'" in body or f"else -- {code}" in body}
    assert (set(OPCODES), set(OPCODES)) == (documented, handled)
