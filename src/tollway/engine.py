"""The engine: the single writer. decide → sequence → apply → batch → sync → answer.

Every command runs the same path on the event loop, with no ``await`` between deciding and
applying, so each command sees every earlier one::

    decision = decide(state, command, now)        # pure; a refusal writes nothing
    event    = Event(next sequence, now, ...)     # for each payload of a Write
    state.apply(event)                            # the same fold replay uses
    batch.append(encode(event))                   # joins the current group-commit batch
    await batch.durable                           # answered only after fdatasync

Group commit: while one batch is being synced, new records collect in the next one; when the
sync returns, every caller of the batch is answered at once and the next batch starts, but
no sooner than ``wal_sync_gap_ms`` after the previous one started (see ``Engine._kick``). The
event loop writes a batch itself and a helper process syncs it (:mod:`tollway.wal.syncer`: the
sync never waits for this process's GIL); with ``wal_syncer = thread`` an I/O thread does both.
An idempotent replay is answered once the event it repeats is durable. A WAL write or sync
error is fatal (fail-stop): waiting callers get :class:`~tollway.core.errors.WalIOFailure`, the
engine accepts nothing more, and a restart recovers from disk.

The engine holds no global state: several engines (shards) can live in one process, each
with its own data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, NamedTuple, TypeVar

from tollway.config import Durability, Settings, WalSyncer
from tollway.core import commands as cmd
from tollway.core.commands import Refusal
from tollway.core.decide import Replay, Write, decide, outcome
from tollway.core.errors import EngineStopped, TollwayError, WalIOFailure
from tollway.core.events import Event
from tollway.core.ids import UlidGenerator
from tollway.core.observer import NoopObserver, Observer
from tollway.core.state import Account, Entry, State, Transition
from tollway.core.validate import validate
from tollway.wal import codec
from tollway.wal.identity import data_identity
from tollway.wal.log import DirectoryLock, WalWriter, recover
from tollway.wal.replay import gc_paused
from tollway.wal.snapshot import load_newest, snapshot_chunks, write_snapshot
from tollway.wal.syncer import SyncProcess

log = logging.getLogger("tollway.engine")

ARCHIVE_BATCH: Final = 500
"""Entries and credit records one ``entries_archived`` event lists, at most (a record of about 65 KB)."""
SYNC_GAP_BATCH_RECORDS: Final = 32
"""A batch holding this many records starts at once, sync gap or not: its sync is already cheap per record.

The gap is for small batches (the open loop it was measured on made 14-17 records per 2 ms).
With 128 callers each waiting for its last command (``python bench/engine.py --only load``),
a gap that held every batch cut the events per second from 61,005-64,793 to 47,222-48,328; a
threshold of 64 records still to 57,886-60,768 against 62,166-66,039; with 32, 69,716 and 69,513
against 70,441 and 70,007 (two runs each, alternating with the code before the gap).
"""
SNAPSHOT_SLICE_S: Final = 0.002
"""Longest the snapshot encoder holds the event loop before letting commands in."""
SNAPSHOT_BACKGROUND_SHARE: Final = 0.2
"""Most of the event loop a periodic snapshot's encoder takes: after each slice it waits four times as long.

Letting callbacks in between slices is not enough on a busy core: the encoder still took half
the loop until it was done, and requests queued behind it. Measured with ``tollway serve``
pinned to one core at 3,000 reserve/commit pairs per second, snapshots every 100,000 events:
reserves due while a snapshot was encoded waited up to 76-279 ms (longer as the state grew);
with the encoder held to a fifth of the loop, at most 49 ms, and each run's p99 fell from
62-143 ms to 8.6-9.8 ms (4 runs). A snapshot of 126,000 entries takes 0.96 s instead of 0.21 s
on an idle loop: it is in the background, and nothing waits for it.
"""

Clock = Callable[[], int]
Listener = Callable[[list[Event], list[bytes]], None]
T = TypeVar("T")


def system_clock_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def _random80() -> int:
    return int.from_bytes(os.urandom(10), "big")


class Archived(NamedTuple):
    """What :meth:`Engine.archive_once` dropped: settled entries and credit idempotency records."""

    entries: int = 0
    credits: int = 0


class _Durable(asyncio.Future[None]):
    """A batch's durability, awaited by every caller of the batch; no caller can cancel it.

    A caller cancelled while it waits gets ``CancelledError`` once the batch is durable (its
    command is written either way, as it already joined the batch). This replaces an
    ``asyncio.shield`` per caller, which cost ~2 µs per command.
    """

    def cancel(self, msg: object = None) -> bool:  # noqa: ARG002 - the signature of Future.cancel
        """Refuse: the future belongs to all of the batch's callers."""
        return False


class _Batch:
    """Records waiting for one write + sync, and the future their callers wait on."""

    __slots__ = ("chunks", "durable", "events", "first_seq", "last_seq", "size", "transitions")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.first_seq = 0
        self.last_seq = 0
        self.events: list[Event] = []
        self.transitions: list[tuple[Event, Transition]] = []
        self.durable: asyncio.Future[None] = _Durable(loop=loop)


class Engine:
    """The single writer of one data directory. Create it with :meth:`open`."""

    def __init__(
        self,
        settings: Settings,
        state: State,
        writer: WalWriter,
        lock: DirectoryLock,
        *,
        clock: Clock,
        observer: Observer,
        random80: Callable[[], int],
        syncer: SyncProcess | None = None,
        identity: str = "",
    ) -> None:
        self.settings = settings
        self.state = state
        self.identity = identity  # the data directory's id (tollway.wal.identity)
        self.policy = settings.policy()
        self.observer = observer
        self._clock = clock
        self._ids = UlidGenerator(clock, random80)
        self._writer = writer
        self._syncer = syncer  # None: the I/O thread writes and syncs (or durability is none)
        self._lock = lock
        self._loop = asyncio.get_running_loop()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-wal")
        self._snap_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-snapshot")
        self._pending = _Batch(self._loop)
        self._inflight: _Batch | None = None
        fsync = settings.durability is Durability.FSYNC
        self._sync_gap_s = settings.wal_sync_gap_ms / 1000 if fsync else 0.0
        self._next_write_at = 0.0  # perf_counter: the next batch starts no sooner (the sync gap)
        self._gap_timer: asyncio.TimerHandle | None = None
        self._durable_seq = state.last_sequence
        self._snapshot_seq = state.last_sequence
        self._snapshot_tried_seq = state.last_sequence  # when the last periodic snapshot was started
        self._snapshot_task: asyncio.Task[None] | None = None
        self._failure: TollwayError | None = None
        self._closed = False
        self._closing = False  # close() waits for a background snapshot: it runs at full speed from then on
        self._listeners: list[Listener] = []
        self.on_fatal: Callable[[BaseException], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        data_dir: Path | str | None = None,
        settings: Settings | None = None,
        *,
        clock: Clock = system_clock_ms,
        observer: Observer | None = None,
        random80: Callable[[], int] = _random80,
    ) -> AsyncIterator[Engine]:
        """Lock the data directory, recover state from disk, and yield a running engine."""
        settings = settings or Settings()
        if data_dir is not None:
            settings = settings.replace(data_dir=Path(data_dir))
        engine = await cls.start(settings, clock=clock, observer=observer, random80=random80)
        try:
            yield engine
        finally:
            await engine.close()

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        clock: Clock = system_clock_ms,
        observer: Observer | None = None,
        random80: Callable[[], int] = _random80,
    ) -> Engine:
        """Open without a context manager; the caller must ``await engine.close()``."""
        observer = observer or NoopObserver()
        for directory in (settings.data_dir, settings.wal_dir, settings.snapshot_dir):
            directory.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(settings.wal_dir / "LOCK")
        lock.acquire()
        try:
            identity = data_identity(settings.wal_dir, durable=settings.durability is Durability.FSYNC)
            state, writer = await asyncio.to_thread(_recover, settings, observer)
        except BaseException:
            lock.release()
            raise
        if settings.durability is Durability.NONE:
            log.warning("durability=none: the WAL is NOT synced; acknowledged commands can be lost (tests only)")
        syncer = None
        if settings.durability is Durability.FSYNC and settings.wal_syncer is WalSyncer.PROCESS:
            try:
                syncer = SyncProcess.start()
            except BaseException:
                writer.close()
                lock.release()
                raise
        return cls(
            settings,
            state,
            writer,
            lock,
            clock=clock,
            observer=observer,
            random80=random80,
            syncer=syncer,
            identity=identity,
        )

    async def close(self) -> None:
        """Finish pending writes, take a final snapshot, release the lock."""
        if self._closed:
            return
        try:
            if self._failure is None:
                await self._wait_durable(self.state.last_sequence)
                if self._snapshot_task is not None:
                    self._closing = True
                    await self._snapshot_task
                if self.state.last_sequence > self._snapshot_seq:
                    await self._snapshot()
        finally:
            self._closed = True
            if self._syncer is not None:
                await self._syncer.close()
            await asyncio.to_thread(self._writer.close)
            self._io.shutdown(wait=True)
            self._snap_io.shutdown(wait=True)
            self._lock.release()

    async def abort(self) -> None:
        """Stop at once, as a crash would: no final snapshot, nothing pending is written.

        Everything already acknowledged is on disk, so reopening recovers it; callers still
        waiting get :class:`EngineStopped`. Used after a fatal error and by crash tests.
        """
        if self._closed:
            return
        self._closed = True
        stopped = EngineStopped("the engine was aborted")
        if not self._pending.durable.done():
            self._pending.durable.set_exception(stopped)
            self._pending.durable.exception()
        self._io.shutdown(wait=True)  # an in-flight write finishes or fails; no new one starts
        if self._syncer is not None:
            await self._syncer.close()  # the same for a sync in flight
        self._snap_io.shutdown(wait=True)
        await asyncio.to_thread(self._writer.close)
        self._lock.release()

    def set_holds_allowed(self, allowed: bool) -> None:
        """Open or close the gate on new holds and charges (the conservation guard's lever).

        Commits, releases and settlement outcomes are never gated: refusing them would lose money.
        """
        self.policy = dataclasses.replace(self.policy, holds_allowed=allowed)

    def now_ms(self) -> int:
        """The engine's clock, for components that must agree with it (lag, rebuild times)."""
        return self._clock()

    @property
    def durable_sequence(self) -> int:
        """The highest sequence known to be on disk."""
        return self._durable_seq

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(events, records)`` with each batch once it is durable (on the event loop).

        ``records`` are the events' framed WAL records, one per event, as written.
        """
        self._listeners.append(listener)

    # -- the command path ------------------------------------------------------------------

    async def execute(self, command: cmd.Command) -> cmd.Outcome:
        """Validate, decide, write and answer one command. Raises on bad input or failure."""
        self._check_running()
        command = validate(command)
        started = time.perf_counter()
        while (
            self._pending.size >= self.settings.batch_bytes_max
            or len(self._pending.chunks) >= self.settings.batch_records_max
        ):
            await self._pending.durable  # backpressure: the batch is full
            self._check_running()
        now_ms = self._clock()
        decision = decide(self.state, command, now_ms, self.policy, self._ids.new)
        name = type(command).__name__
        if isinstance(decision, Refusal):
            self.observer.refused(name, decision.code.value)
            return decision
        if isinstance(decision, Replay):
            await self._wait_durable(decision.wal_sequence)
            return decision.outcome
        batch, outcome = self._write(decision, command, now_ms)
        await batch.durable
        self.observer.command_done(name, time.perf_counter() - started)
        return outcome

    def _write(self, decision: Write, command: cmd.Command, now_ms: int) -> tuple[_Batch, cmd.Outcome]:
        """Sequence, apply and enqueue the events of ``decision``. Never awaits."""
        batch = self._pending
        events = [
            Event(self.state.last_sequence + 1 + i, now_ms, decision.billing_entry_id, decision.correlation_id, payload)
            for i, payload in enumerate(decision.payloads)
        ]
        records = [codec.encode(event) for event in events]  # InvalidInput before anything changes
        try:
            for event, record in zip(events, records, strict=True):
                change = self.state.apply(event)
                if not batch.chunks:
                    batch.first_seq = event.wal_sequence
                    self._loop.call_soon(self._kick)
                batch.chunks.append(record)
                if len(batch.chunks) == SYNC_GAP_BATCH_RECORDS and self._gap_timer is not None:
                    self._loop.call_soon(self._kick)  # large enough to start before the gap ends
                batch.size += len(record)
                batch.last_seq = event.wal_sequence
                batch.events.append(event)
                if change is not None:
                    batch.transitions.append((event, change))
        except TollwayError as exc:  # an invariant broke inside apply: state is suspect
            self._fail(exc)
            raise
        return batch, outcome(self.state, decision, command)

    # -- group commit ----------------------------------------------------------------------

    def _kick(self) -> None:
        """Start writing the pending batch unless a write is in flight or the sync gap has not passed.

        The sync gap (``wal_sync_gap_ms``, fsync durability only): a small batch starts no sooner
        than the gap after the previous one started, so an engine busy with few callers at a
        time syncs at most ``1 / gap`` times a second. A sync is not cheap on the engine's core:
        the helper's ``fdatasync`` itself (about 130 us of CPU on a VM's virtio disk), two
        context switches, and the caches they leave cold. At partial load, syncs back to back
        made small batches that cost more CPU per request than at full load. Measured with
        ``tollway serve`` pinned to one core, reserve/commit pairs on a fixed open-loop schedule
        of 3,600 a second (``bench/http.py``'s 80 % phase on that machine), servers alternating,
        eight 10 s phases per setting (medians): with no gap, 1,176 syncs a second, the core
        97 % busy (268 us of CPU per pair), reserve p50 2.9 ms and p99 9.8 ms; with a 2 ms gap,
        521 syncs a second, 85 % busy (235 us), p50 2.5 ms and p99 8.3 ms. Longer gaps saved
        little more CPU (222 us at 4 ms, in another run) and added their wait to every answer.
        An idle engine is not slowed: the first batch after a pause starts at once; nor are many
        callers: a batch of :data:`SYNC_GAP_BATCH_RECORDS` starts without waiting for the gap.
        """
        if not self._may_write():
            return
        if self._sync_gap_s:
            wait_s = self._next_write_at - time.perf_counter()
            if wait_s > 0 and len(self._pending.chunks) < SYNC_GAP_BATCH_RECORDS:
                if self._gap_timer is None:
                    self._gap_timer = self._loop.call_later(wait_s, self._gap_passed)
                return
            if self._gap_timer is not None:
                self._gap_timer.cancel()
                self._gap_timer = None
        self._start_write()

    def _gap_passed(self) -> None:
        """The sync gap's timer: start the pending batch (the loop's timers may fire a little early)."""
        self._gap_timer = None
        if self._may_write():
            self._start_write()

    def _may_write(self) -> bool:
        """Whether a pending batch could start now: records wait, no write is in flight, the engine runs."""
        return self._inflight is None and bool(self._pending.chunks) and self._failure is None and not self._closed

    def _start_write(self) -> None:
        """Write the pending batch and sync it; the next batch collects meanwhile (and waits out the gap)."""
        batch = self._inflight = self._pending
        self._pending = _Batch(self._loop)
        data = b"".join(batch.chunks)
        started = time.perf_counter()
        self._next_write_at = started + self._sync_gap_s
        if self._syncer is None:
            future = self._loop.run_in_executor(self._io, self._writer.write_batch, data, batch.first_seq)
        else:
            future = self._append_and_sync(self._syncer, data, batch.first_seq)
        future.add_done_callback(lambda f: self._written(batch, f, len(data), started))

    def _append_and_sync(self, syncer: SyncProcess, data: bytes, first_seq: int) -> asyncio.Future[None]:
        """Write ``data`` here (into the page cache) and have the sync helper make it durable."""
        try:
            self._writer.append(data, first_seq)
        except WalIOFailure as exc:
            failed: asyncio.Future[None] = self._loop.create_future()
            failed.set_exception(exc)
            return failed
        return syncer.sync(self._writer.fd, self._writer.generation)

    def _written(self, batch: _Batch, future: asyncio.Future[None], size: int, started: float) -> None:
        self._inflight = None
        exc = future.exception()
        if exc is not None:
            self._fail(exc, batch)
            return
        if self._failure is not None:  # stopped meanwhile; this batch's waiters already have the error
            return
        self._durable_seq = batch.last_seq
        batch.durable.set_result(None)
        self.observer.wal_batch(len(batch.chunks), size, time.perf_counter() - started)
        if batch.transitions:
            self.observer.transitioned(batch.transitions)
        for listener in self._listeners:
            listener(batch.events, batch.chunks)
        if self._pending.chunks:
            self._kick()
        if not self._closed:
            self._maybe_snapshot()

    async def _wait_durable(self, seq: int) -> None:
        """Return once ``seq`` is on disk."""
        while seq > self._durable_seq:
            self._check_running()
            batch = self._inflight if self._inflight is not None and seq <= self._inflight.last_seq else self._pending
            await batch.durable

    def _fail(self, exc: BaseException, failed: _Batch | None = None) -> None:
        """Fail-stop: refuse everything from now on and wake every waiter with the error."""
        if self._failure is not None:
            return
        log.critical("engine stopped: %s", exc)
        self._failure = exc if isinstance(exc, TollwayError) else WalIOFailure(str(exc))
        for batch in (failed, self._inflight, self._pending):
            if batch is not None and not batch.durable.done():
                batch.durable.set_exception(self._failure)
                batch.durable.exception()  # mark retrieved: not every batch has a waiter
        if self.on_fatal is not None:
            self.on_fatal(self._failure)

    def _check_running(self) -> None:
        if self._failure is not None:
            raise EngineStopped(f"the engine stopped after a fatal error: {self._failure}") from self._failure
        if self._closed:
            raise EngineStopped("the engine is closed")

    # -- snapshots -------------------------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        due = self._durable_seq - self._snapshot_tried_seq >= self.settings.snapshot_every_events
        if due and (self._snapshot_task is None or self._snapshot_task.done()):
            self._snapshot_tried_seq = self._durable_seq
            self._snapshot_task = self._loop.create_task(self._periodic_snapshot())

    async def _periodic_snapshot(self) -> None:
        """In the background; one that fails is logged and tried again a whole interval later, not at once."""
        try:
            await self._snapshot(background=True)
        except OSError:  # the disk is full or unwritable: the WAL still has everything
            log.exception("snapshot failed, the next one is due in %d events", self.settings.snapshot_every_events)

    async def _snapshot(self, *, background: bool = False) -> None:
        """Copy the state now; encode it a slice at a time; write it once all it includes is durable."""
        seq, chunks = await self._encode_snapshot(background)
        await self._wait_durable(seq)
        durable = self.settings.durability is Durability.FSYNC
        await self._loop.run_in_executor(
            self._snap_io,
            lambda: write_snapshot(
                self.settings.snapshot_dir, seq, chunks, keep=self.settings.snapshots_kept, durable=durable
            ),
        )
        self._snapshot_seq = max(self._snapshot_seq, seq)
        self._snapshot_tried_seq = max(self._snapshot_tried_seq, seq)

    async def _encode_snapshot(self, background: bool) -> tuple[int, list[bytes]]:
        """A consistent copy of the state, encoded in slices with callers let in between.

        Encoding half a million entries takes a few hundred milliseconds; done in one go on the
        event loop it stalled every command for that long. The copy is cheap (immutable
        entries are shared), and each slice takes about two milliseconds. In the ``background``
        the encoder waits after each slice so that it takes at most
        :data:`SNAPSHOT_BACKGROUND_SHARE` of the loop, until :meth:`close` waits for it;
        otherwise (on close, on request) it only lets waiting callbacks run between slices.
        """
        pause_per_busy = 1 / SNAPSHOT_BACKGROUND_SHARE - 1 if background else 0.0
        frozen = self.state.freeze()
        chunks: list[bytes] = []
        since_yield = time.perf_counter()
        for chunk in snapshot_chunks(frozen):
            chunks.append(chunk)
            busy_s = time.perf_counter() - since_yield
            if busy_s > SNAPSHOT_SLICE_S:
                await asyncio.sleep(0 if self._closing else busy_s * pause_per_busy)
                since_yield = time.perf_counter()
        return frozen.last_sequence, chunks  # framed (checksummed) by the writing thread

    async def snapshot_now(self) -> int:
        """Write a snapshot of the current state; returns its sequence."""
        self._check_running()
        await self._snapshot()
        return self._snapshot_seq

    # -- reads -----------------------------------------------------------------------------

    async def wait_durable(self, seq: int) -> None:
        """Return once the event at ``seq`` (and all before it) is on disk."""
        await self._wait_durable(seq)

    async def export_state(self) -> State:
        """A detached copy of the state, consistent at one sequence, once that sequence is durable.

        For rebuilding projections: the copy is taken in one step on the event loop (so no
        command lands halfway through it; entries are immutable and shared) and its indexes
        are rebuilt in a thread.
        """
        self._check_running()
        frozen = self.state.freeze()
        await self._wait_durable(frozen.last_sequence)
        return await asyncio.to_thread(State.from_snapshot, frozen)

    def balance(self, account_id: str) -> Account:
        """A copy of the account's balances (zeros for an unknown account)."""
        account = self.state.account(account_id)
        return account.copy()

    async def read_balance(self, account_id: str) -> Account:
        """The account's balances, once everything they reflect is durable."""
        await self._wait_durable(self.state.last_sequence)
        return self.balance(account_id)

    async def get_entry(self, billing_entry_id: str) -> Entry | None:
        """An entry, once the state it reflects is durable."""
        entry = self.state.entries.get(billing_entry_id)
        if entry is not None:
            await self._wait_durable(entry.wal_sequence)
        return entry

    # -- the expiry sweeper ----------------------------------------------------------------

    async def sweep_once(self) -> int:
        """Expire due holds, at most ``sweep_batch_max``; returns how many were expired."""
        self._check_running()
        due = self.state.due_holds(self._clock(), self.settings.sweep_batch_max)
        if not due:
            return 0
        results = await asyncio.gather(*(self.execute(cmd.Expire(entry_id)) for entry_id in due))
        return sum(1 for result in results if isinstance(result, cmd.EntryResult))

    # -- the archiver -----------------------------------------------------------------------

    async def archive_once(self) -> Archived:
        """Archive what is past the retention, at most :data:`ARCHIVE_BATCH` records per event.

        Settled entries (with their idempotency keys and stored responses) and the idempotency
        records of credits, oldest first. Runs until none is left, one event at a time, so billing
        gets in between. Returns zeros when retention is off (``entry_retention_hours`` 0).
        """
        retention_ms = self.settings.entry_retention_hours * 3_600_000
        if retention_ms == 0:
            return Archived()
        cutoff_ms = self._clock() - retention_ms
        if not self.state.archivable(cutoff_ms, 1) and not self.state.archivable_credits(cutoff_ms, 1):
            return Archived()  # the usual answer: no command written, no refusal counted
        entries = credit_records = 0
        while True:
            result = await self.execute(cmd.Archive(self._clock() - retention_ms, ARCHIVE_BATCH))
            if not isinstance(result, cmd.ArchiveResult):  # exactly a full batch was left: nothing more
                return Archived(entries, credit_records)
            entries += result.archived
            credit_records += result.credits
            if result.archived + result.credits < ARCHIVE_BATCH:
                return Archived(entries, credit_records)

    async def run_archiver(self) -> None:
        """Archive forever, every ``archive_interval_s``; cancel the task to stop it."""
        while True:
            archived = await self.archive_once()
            if any(archived):
                log.info(
                    "archived %d entries and %d credit records past the %d h retention",
                    archived.entries,
                    archived.credits,
                    self.settings.entry_retention_hours,
                )
            await asyncio.sleep(self.settings.archive_interval_s)

    async def run_sweeper(self) -> None:
        """Sweep forever, every ``sweep_interval_ms``; cancel the task to stop it."""
        while True:
            expired = await self.sweep_once()
            # A full tick means a backlog: go again at once (callers still get in between).
            pause_s = 0 if expired >= self.settings.sweep_batch_max else self.settings.sweep_interval_ms / 1000
            await asyncio.sleep(pause_s)


def _recover(settings: Settings, observer: Observer) -> tuple[State, WalWriter]:
    """Newest sound snapshot + the WAL after it; runs in a thread at startup.

    Recovery creates millions of long-lived, acyclic objects; the cyclic garbage collector
    would rescan them over and over for nothing, halving replay speed. It is paused while
    recovering, and what was built is moved out of its sight with ``gc.freeze()``.
    """
    started = time.perf_counter()
    with gc_paused():
        loaded = load_newest(settings.snapshot_dir)
        state = loaded.state
        recovery = recover(settings.wal_dir, loaded.sequence, state.apply)
    gc.freeze()
    for reason in loaded.skipped:
        log.warning("skipped snapshot %s", reason)
    if recovery.torn_tail:
        log.warning("WAL recovery: %s", recovery.torn_tail)
    observer.recovered(recovery.replayed, time.perf_counter() - started, loaded.sequence)
    writer = WalWriter(
        settings.wal_dir, segment_bytes=settings.segment_bytes, durable=settings.durability is Durability.FSYNC
    )
    writer.resume(recovery.segment, recovery.end_offset)
    return state, writer
