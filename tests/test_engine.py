"""The engine's concurrency, group commit, durability ordering, sweeper and restarts (SPEC §2, §4–6)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tollway import (
    Commit,
    Credit,
    CreditKind,
    Engine,
    EngineStopped,
    EntryResult,
    EntryState,
    Refusal,
    RefusalCode,
    Reserve,
    Settings,
)
from tollway.config import Durability, WalSyncer
from tollway.core.commands import Outcome, Release
from tollway.core.ledger import Ledger, check_invariants
from tollway.group_commit import SYNC_GAP_BATCH_RECORDS
from tollway.housekeeping import run_sweeper, sweep_once
from tollway.testing import FakeClock, RecordingObserver
from tollway.wal.file_log import FileLog
from tollway.wal.segments import iter_events


async def mint(engine: Engine, account: str, amount: int, credit_id: str = "mint-1") -> None:
    result = await engine.execute(Credit(account, credit_id, CreditKind.MINT, amount))
    assert not isinstance(result, Refusal)


def ledger_problems(engine: Engine) -> list[str]:
    return check_invariants(engine.state, Ledger().post_all(iter_events(engine.settings.wal_dir)))


async def test_thousand_concurrent_reserves_exactly_hundred_succeed(engine: Engine) -> None:
    """1,000 concurrent reserves against funds for exactly 100: 100 holds, available 0, never negative."""
    await mint(engine, "acct", 100 * 7_000)
    results = await asyncio.gather(*(engine.execute(Reserve("acct", f"r{i}", 7_000)) for i in range(1_000)))
    granted = [r for r in results if isinstance(r, EntryResult)]
    refused = {r.code for r in results if isinstance(r, Refusal)}
    assert 100 == len(granted)
    assert {RefusalCode.INSUFFICIENT_FUNDS} == refused
    balance = engine.balance("acct")
    assert (0, 700_000) == (balance.available_micro, balance.held_micro)
    assert [] == ledger_problems(engine)  # the ledger fold checks non-negativity at every sequence


async def test_concurrent_records_share_a_sync(engine: Engine, observer: RecordingObserver) -> None:
    """Records pending at the same time are written and synced as one batch."""
    await mint(engine, "acct", 10**9)
    observer.batches.clear()
    await asyncio.gather(*(engine.execute(Reserve("acct", f"r{i}", 10)) for i in range(200)))
    assert 200 == sum(records for records, _ in observer.batches)
    assert len(observer.batches) < 20


GAP_MS = 100  # the longest sync gap: far longer than a sync, so waiting for it shows


async def test_a_batch_starts_no_sooner_than_the_sync_gap(settings: Settings, clock: FakeClock) -> None:
    """Commands one after another each wait for the gap since the previous batch started."""
    async with Engine.open(settings=settings.replace(wal_sync_gap_ms=GAP_MS), clock=clock) as engine:
        started = time.perf_counter()
        await mint(engine, "acct", 1_000)  # its batch starts at once: nothing was written before
        for number in range(2):
            assert isinstance(await engine.execute(Reserve("acct", f"r{number}", 10)), EntryResult)
        assert time.perf_counter() - started >= 2 * GAP_MS / 1000 - 0.005  # the loop's timers are per millisecond


async def test_commands_arriving_within_the_gap_share_one_batch(settings: Settings, clock: FakeClock) -> None:
    """Commands made while the gap runs collect in one batch, whatever the moment each came."""
    observer = RecordingObserver()
    gap = settings.replace(wal_sync_gap_ms=GAP_MS)
    async with Engine.open(settings=gap, clock=clock, observer=observer) as engine:
        await mint(engine, "acct", 1_000)
        observer.batches.clear()
        tasks = []
        for number in range(5):
            tasks.append(asyncio.create_task(engine.execute(Reserve("acct", f"r{number}", 10))))
            await asyncio.sleep(0)  # each in a loop iteration of its own, well inside the gap (no timer:
            # a 5 ms sleep each took the five past the 100 ms gap on a loaded machine)
        await asyncio.gather(*tasks)
        assert [5] == [records for records, _ in observer.batches]


async def test_a_large_batch_does_not_wait_for_the_gap(settings: Settings, clock: FakeClock) -> None:
    """A batch that reaches SYNC_GAP_BATCH_RECORDS starts at once, even while the gap's timer runs."""
    observer = RecordingObserver()
    async with Engine.open(settings=settings.replace(wal_sync_gap_ms=GAP_MS), clock=clock, observer=observer) as engine:
        await mint(engine, "acct", 10**9)
        few = [asyncio.create_task(engine.execute(Reserve("acct", f"a{i}", 10))) for i in range(5)]
        await settle_loop()
        assert engine._commits._gap_timer is not None  # a small batch waits
        many = [
            asyncio.create_task(engine.execute(Reserve("acct", f"b{i}", 10))) for i in range(SYNC_GAP_BATCH_RECORDS)
        ]
        await settle_loop()
        assert engine._commits._gap_timer is None
        commits = engine._commits
        assert commits.inflight is not None or all(task.done() for task in few + many)  # started without the timer
        await asyncio.gather(*few, *many)
        assert [5 + SYNC_GAP_BATCH_RECORDS] == [records for records, _ in observer.batches[1:]]


async def test_after_a_pause_a_batch_starts_at_once(settings: Settings, clock: FakeClock) -> None:
    """The gap counts from the previous batch's start: an engine idle longer than it waits for nothing."""
    async with Engine.open(settings=settings.replace(wal_sync_gap_ms=GAP_MS), clock=clock) as engine:
        await mint(engine, "acct", 1_000)
        await asyncio.sleep(GAP_MS / 1000 + 0.01)
        task = asyncio.create_task(engine.execute(Reserve("acct", "r1", 10)))
        await settle_loop()
        assert engine._commits._gap_timer is None
        assert engine._commits.inflight is not None or task.done()  # writing (or written) without a timer
        await task


@contextlib.asynccontextmanager
async def reserve_waiting_for_the_gap(
    gap: Settings, clock: FakeClock
) -> AsyncIterator[tuple[Engine, asyncio.Task[Outcome]]]:
    """An engine with ``gap``, a funded account, and a reserve whose batch waits for the gap's timer."""
    async with Engine.open(settings=gap, clock=clock) as engine:
        await mint(engine, "acct", 1_000)  # this batch starts at once; the next one waits for the gap
        task = asyncio.create_task(engine.execute(Reserve("acct", "r1", 10)))
        await settle_loop()
        assert engine._commits._gap_timer is not None
        yield engine, task


async def test_closing_writes_a_batch_waiting_for_the_gap(settings: Settings, clock: FakeClock) -> None:
    """A batch still waiting for the gap when the engine closes is written, synced and recovered."""
    gap = settings.replace(wal_sync_gap_ms=GAP_MS)
    async with reserve_waiting_for_the_gap(gap, clock) as (_, task):
        pass
    assert isinstance(await task, EntryResult)
    async with Engine.open(settings=gap, clock=clock) as reopened:
        assert 10 == reopened.balance("acct").held_micro


async def test_an_abort_during_the_gap_writes_nothing_more(settings: Settings, clock: FakeClock) -> None:
    """Aborting while a batch waits for the gap fails its callers; the timer writes nothing after."""
    gap = settings.replace(wal_sync_gap_ms=GAP_MS)
    async with reserve_waiting_for_the_gap(gap, clock) as (engine, task):
        await engine.abort()
        with pytest.raises(EngineStopped):
            await task
        await asyncio.sleep(GAP_MS / 1000 + 0.02)  # the gap's timer has fired
        assert engine._commits.inflight is None
    async with Engine.open(settings=gap, clock=clock) as reopened:
        assert (1_000, 0) == (reopened.balance("acct").available_micro, reopened.balance("acct").held_micro)


async def test_without_fsync_there_is_no_gap(settings: Settings, clock: FakeClock) -> None:
    """``durability = none`` never syncs, so nothing waits for a gap."""
    unsynced = settings.replace(durability=Durability.NONE, wal_sync_gap_ms=GAP_MS)
    async with Engine.open(settings=unsynced, clock=clock) as engine:
        await mint(engine, "acct", 1_000)
        task = asyncio.create_task(engine.execute(Reserve("acct", "r1", 10)))
        await settle_loop()
        assert engine._commits._gap_timer is None
        await task


class GatedWrites:
    """Holds every WAL sync until released, to observe what waits for durability.

    With the sync helper (the default) the sync request is held; with ``wal_syncer = thread``
    the I/O thread's whole write.
    """

    def __init__(self, engine: Engine) -> None:
        self.gate = threading.Event()
        self.relays: set[asyncio.Task[None]] = set()
        assert isinstance(engine.log, FileLog)
        writer, syncer = engine.log.writer, engine.log.syncer
        if syncer is None:
            original: Callable[[bytes, int], None] = writer.write_batch

            def gated(data: bytes, first_seq: int) -> None:
                self.gate.wait(timeout=30)
                original(data, first_seq)

            writer.write_batch = gated  # type: ignore[method-assign]
            return
        original_sync = syncer.sync

        def gated_sync(fd: int, generation: int) -> asyncio.Future[None]:
            held: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def relay() -> None:
                await asyncio.to_thread(self.gate.wait, 30)
                try:
                    await original_sync(fd, generation)
                except Exception as exc:  # noqa: BLE001 - handed to the waiter as it is
                    held.set_exception(exc)
                else:
                    held.set_result(None)

            task = asyncio.create_task(relay())
            self.relays.add(task)
            task.add_done_callback(self.relays.discard)
            return held

        syncer.sync = gated_sync  # type: ignore[method-assign]


async def settle_loop() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture(params=list(WalSyncer))
async def either_engine(request: pytest.FixtureRequest, settings: Settings, clock: FakeClock) -> AsyncIterator[Engine]:
    """A running engine with each ``wal_syncer`` in turn."""
    async with Engine.open(settings=settings.replace(wal_syncer=request.param), clock=clock) as running:
        assert isinstance(running.log, FileLog)
        assert (running.log.syncer is None) == (request.param is WalSyncer.THREAD)
        yield running


async def test_answer_only_after_sync(either_engine: Engine) -> None:
    """A command is not answered while its record is not yet on disk, and is once it is."""
    engine = either_engine
    await mint(engine, "acct", 1_000)
    gate = GatedWrites(engine)
    task = asyncio.create_task(engine.execute(Reserve("acct", "r1", 10)))
    await settle_loop()
    assert not task.done()
    assert engine.durable_sequence < engine.state.last_sequence
    gate.gate.set()
    result = await task
    assert isinstance(result, EntryResult)
    assert engine.state.last_sequence == engine.durable_sequence


async def test_replay_waits_for_the_original_to_be_durable(engine: Engine) -> None:
    """An idempotent repeat is not answered before the event it repeats is durable."""
    await mint(engine, "acct", 1_000)
    held = await engine.execute(Reserve("acct", "r1", 10))
    assert isinstance(held, EntryResult)
    gate = GatedWrites(engine)
    first = asyncio.create_task(engine.execute(Commit(held.entry.billing_entry_id, 5)))
    await settle_loop()
    repeat = asyncio.create_task(engine.execute(Commit(held.entry.billing_entry_id, 5)))
    await settle_loop()
    assert (False, False) == (first.done(), repeat.done())
    gate.gate.set()
    original, again = await first, await repeat
    assert isinstance(original, EntryResult)
    assert isinstance(again, EntryResult)
    assert (False, True) == (original.replayed, again.replayed)


async def test_reads_wait_for_durability(engine: Engine) -> None:
    """A balance read never shows money movements that are not yet durable."""
    await mint(engine, "acct", 1_000)
    gate = GatedWrites(engine)
    task = asyncio.create_task(engine.execute(Reserve("acct", "r1", 10)))
    await settle_loop()
    read = asyncio.create_task(engine.read_balance("acct"))
    await settle_loop()
    assert not read.done()
    gate.gate.set()
    await task
    assert 990 == (await read).available_micro


async def test_backpressure_when_batch_is_full(settings: Settings, clock: FakeClock) -> None:
    """With a tiny batch limit every command still completes, in batches no larger than the limit."""
    observer = RecordingObserver()
    async with Engine.open(settings=settings.replace(batch_records_max=3), clock=clock, observer=observer) as engine:
        await mint(engine, "acct", 10**6)
        results = await asyncio.gather(*(engine.execute(Reserve("acct", f"r{i}", 1)) for i in range(50)))
        assert all(isinstance(r, EntryResult) for r in results)
        assert max(records for records, _ in observer.batches) <= 3


async def test_sweeper_expires_in_order_with_a_bounded_batch(settings: Settings, clock: FakeClock) -> None:
    """Due holds expire in (expires_at, id) order, at most sweep_batch_max per tick, funds returned."""
    async with Engine.open(settings=settings.replace(sweep_batch_max=3), clock=clock) as engine:
        await mint(engine, "acct", 1_000)
        ids = []
        for i, ttl in enumerate([5, 1, 3, 2, 4, 60]):
            held = await engine.execute(Reserve("acct", f"r{i}", 10, ttl_s=ttl))
            assert isinstance(held, EntryResult)
            ids.append(held.entry.billing_entry_id)
        clock.advance(5_000)
        assert 3 == await sweep_once(engine)
        assert 2 == await sweep_once(engine)
        assert 0 == await sweep_once(engine)
        expired = [
            e.billing_entry_id for e in iter_events(settings.wal_dir) if e.event_type == "billing_reserve_expired"
        ]
        assert [ids[1], ids[3], ids[2], ids[4], ids[0]] == expired
        assert (990, 10) == (engine.balance("acct").available_micro, engine.balance("acct").held_micro)


async def test_sweeper_task_runs_on_its_interval(settings: Settings, clock: FakeClock) -> None:
    """The background sweeper expires due holds by itself."""
    async with Engine.open(settings=settings.replace(sweep_interval_ms=1), clock=clock) as engine:
        await mint(engine, "acct", 100)
        held = await engine.execute(Reserve("acct", "r", 100, ttl_s=1))
        assert isinstance(held, EntryResult)
        clock.advance(1_000)
        sweeper = asyncio.create_task(run_sweeper(engine))
        try:
            for _ in range(500):
                if engine.state.entry_state(held.entry.billing_entry_id) is EntryState.RELEASED:
                    break
                await asyncio.sleep(0.001)
        finally:
            sweeper.cancel()
        assert EntryState.RELEASED == engine.state.entry_state(held.entry.billing_entry_id)


async def test_idempotency_survives_restart(settings: Settings, clock: FakeClock) -> None:
    """After a restart a duplicate request gets the stored entry and response, not a second hold."""
    async with Engine.open(settings=settings, clock=clock) as engine:
        await mint(engine, "acct", 1_000)
        held = await engine.execute(Reserve("acct", "r1", 100))
        assert isinstance(held, EntryResult)
        await engine.execute(Commit(held.entry.billing_entry_id, 60, response_json='{"answer": 42}'))
    clock.advance(23 * 3_600_000)
    async with Engine.open(settings=settings, clock=clock) as engine:
        again = await engine.execute(Reserve("acct", "r1", 100))
        assert isinstance(again, EntryResult)
        assert (True, '{"answer": 42}', held.entry.billing_entry_id) == (
            again.replayed,
            again.response_json,
            again.entry.billing_entry_id,
        )
        assert 940 == engine.balance("acct").available_micro


async def test_durability_none_is_logged_loudly(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Running without fsync says so at warning level."""
    with caplog.at_level(logging.WARNING, logger="tollway.engine"):
        async with Engine.open(settings=settings.replace(durability=Durability.NONE)):
            pass
    assert any("durability=none" in record.message for record in caplog.records)


async def test_closed_engine_refuses_commands(settings: Settings) -> None:
    """After close, commands raise EngineStopped instead of silently doing nothing."""
    async with Engine.open(settings=settings) as engine:
        pass
    with pytest.raises(EngineStopped):
        await engine.execute(Release("01ARZ3NDEKTSV4RRFFQ69G5FAV", "user_cancel"))


async def test_two_engines_share_a_process(tmp_path: Path, clock: FakeClock) -> None:
    """No global state: two engines (shards) on two data directories run side by side."""
    async with (
        Engine.open(tmp_path / "shard-a", clock=clock) as shard_a,
        Engine.open(tmp_path / "shard-b", clock=clock) as shard_b,
    ):
        await mint(shard_a, "acct", 10)
        await mint(shard_b, "acct", 20)
        assert (10, 20) == (shard_a.balance("acct").available_micro, shard_b.balance("acct").available_micro)


async def test_a_cancelled_caller_does_not_cancel_its_batch(engine: Engine) -> None:
    """Cancelling one waiting caller leaves the others of the same group commit unharmed."""
    await mint(engine, "acct", 1_000)
    gate = GatedWrites(engine)
    tasks = [asyncio.create_task(engine.execute(Reserve("acct", f"r{i}", 10))) for i in range(3)]
    await settle_loop()
    tasks[0].cancel()
    await settle_loop()
    gate.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, EntryResult) for r in results[1:])
    assert 3 == sum(1 for e in engine.state.entries.values())  # the cancelled command was written too


class _SteppingClock(FakeClock):
    """A clock that steps back by ``back_ms`` right after its next reading (an NTP correction mid-sweep)."""

    back_ms = 0

    def __call__(self) -> int:
        now, self.back_ms, self.now = self.now, 0, self.now - self.back_ms
        return now


async def test_a_clock_step_back_mid_sweep_leaves_the_hold_in_the_sweepers_queue(settings: Settings) -> None:
    """The sweeper finds a hold due, the clock steps back before its Expire: refused, and swept once due again."""
    clock = _SteppingClock()
    async with Engine.open(settings=settings, clock=clock) as engine:
        await mint(engine, "acct", 1_000)
        held = await engine.execute(Reserve("acct", "r1", 100, ttl_s=1))
        assert isinstance(held, EntryResult)
        clock.advance(1_500)
        clock.back_ms = 1_000  # due_holds reads +1.5 s, the Expire command +0.5 s: not yet expired
        assert 0 == await sweep_once(engine)
        clock.advance(1_000)
        assert 1 == await sweep_once(engine)
        entry = await engine.get_entry(held.entry.billing_entry_id)
        assert entry is not None
        assert (EntryState.RELEASED, "expired", 1_000) == (
            entry.state,
            entry.reason,
            engine.balance("acct").available_micro,
        )


@pytest.mark.parametrize("wal_syncer", list(WalSyncer))
async def test_the_file_log_reads_durable_events_after_a_sequence(
    settings: Settings, clock: FakeClock, wal_syncer: WalSyncer
) -> None:
    """EventLog.read on the file WAL returns at most `limit` durable events after a sequence, in order."""
    async with Engine.open(settings=settings.replace(wal_syncer=wal_syncer), clock=clock) as engine:
        for index in range(5):
            await mint(engine, "acct", 1_000, f"mint-{index}")
        assert [1, 2, 3] == [event.wal_sequence for event in await engine.log.read(0, 3)]
        assert [4, 5] == [event.wal_sequence for event in await engine.log.read(3, 10)]
        assert [] == await engine.log.read(5, 10)
        assert [] == await engine.log.read(0, 0)
