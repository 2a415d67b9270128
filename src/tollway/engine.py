"""The engine: the single writer. decide → sequence → apply → batch → sync → answer.

Every command runs the same path on the event loop, with no ``await`` between deciding and
applying, so each command sees every earlier one::

    decision = decide(state, command, now)        # pure; a refusal writes nothing
    event    = Event(next sequence, now, ...)     # for each payload of a Write
    record   = codec.encode(event)                # framed first: a record too large changes nothing
    change   = state.apply(event)                 # the same fold replay uses
    batch    = group_commit.add(event, record, change)  # into the pending group-commit batch
    await batch.durable                           # answered only once the log made it durable

Group commit (:mod:`tollway.group_commit`): while one batch is being made durable, new records
collect in the next one; when the log returns, every caller of the batch is answered at once.
The engine knows its storage only through the log interface (:mod:`tollway.eventlog`); today
that is the file WAL (:class:`~tollway.wal.file_log.FileLog`), which this module opens and
recovers. An idempotent replay is answered once the event it repeats is durable. A WAL write or
sync error is fatal (fail-stop): waiting callers get :class:`~tollway.core.errors.WalIOFailure`,
the engine accepts nothing more, and a restart recovers from disk. The expiry sweeper and the
archiver are housekeeping that runs beside it (:mod:`tollway.housekeeping`); snapshots are
taken by :mod:`tollway.snapshots`.

An engine keeps no module-level state: several engines (shards) can live in one process, each
with its own data directory. One thing is process-wide: recovery pauses the cyclic garbage
collector while it folds the log, then moves every object of the process out of its sight with
``gc.freeze()`` (harmless to other engines: their objects only stop being scanned for cycles).
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
from pathlib import Path

import msgspec

from tollway.config import Durability, Settings, WalSyncer
from tollway.core import commands as cmd
from tollway.core.commands import Refusal
from tollway.core.decide import Fetch, Loaded, Replay, Write, decide, outcome
from tollway.core.errors import EngineStopped, TollwayError, ensure
from tollway.core.events import Event
from tollway.core.history import apply_answering, fold_entry
from tollway.core.ids import UlidGenerator
from tollway.core.observer import NoopObserver, Observer
from tollway.core.state import Account, Entry, State
from tollway.core.validate import validate
from tollway.eventlog import EventLog, SnapshotStore, read_entry_events
from tollway.group_commit import Batch, BatchListener, GroupCommit, Listener
from tollway.snapshots import Snapshotter
from tollway.wal import codec
from tollway.wal.file_log import FileLog
from tollway.wal.identity import data_identity
from tollway.wal.log import DirectoryLock, WalWriter, recover
from tollway.wal.replay import gc_paused
from tollway.wal.snapshot import load_newest

log = logging.getLogger("tollway.engine")

Clock = Callable[[], int]


def system_clock_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def _random80() -> int:
    return int.from_bytes(os.urandom(10), "big")


class Engine:
    """The single writer of one data directory. Create it with :meth:`open`."""

    def __init__(
        self,
        settings: Settings,
        state: State,
        event_log: EventLog,
        *,
        clock: Clock,
        observer: Observer,
        random80: Callable[[], int],
        identity: str = "",
        new_id: Callable[[], str] | None = None,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.identity = identity  # the data directory's id (tollway.wal.identity)
        self.policy = settings.policy()
        self.observer = observer
        self.log = event_log
        self._clock = clock
        self._new_id = new_id if new_id is not None else UlidGenerator(clock, random80).new  # a shard's: ShardIds.new
        fsync = settings.durability is Durability.FSYNC
        self._commits = GroupCommit(
            event_log,
            observer,
            durable_seq=state.last_sequence,
            sync_gap_s=settings.wal_sync_gap_ms / 1000 if fsync else 0.0,
            on_durable=self._durable,
            on_failure=self._fatal,
        )
        self._snapshots = Snapshotter(
            state,
            self._commits.wait_durable,
            settings.snapshot_dir,
            every_events=settings.snapshot_every_events,
            kept=settings.snapshots_kept,
            durable=fsync,
            store=snapshots,
        )
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
            fsync = settings.durability is Durability.FSYNC
            if not fsync:
                log.warning("durability=none: the WAL is NOT synced; acknowledged commands can be lost (tests only)")
            sync_helper = fsync and settings.wal_syncer is WalSyncer.PROCESS
            wal = FileLog.start(writer, lock, durable_seq=state.last_sequence, sync_helper=sync_helper)
        except BaseException:
            lock.release()
            raise
        return cls(settings, state, wal, clock=clock, observer=observer, random80=random80, identity=identity)

    async def close(self) -> None:
        """Finish pending writes, take a final snapshot, release the log."""
        if self._commits.closed:
            return
        try:
            if self._commits.failure is None:
                await self._commits.wait_durable(self.state.last_sequence)
                await self._snapshots.close()
        finally:
            self._commits.close()
            self._snapshots.shutdown()
            await self.log.close()

    async def abort(self) -> None:
        """Stop at once, as a crash would: no final snapshot, nothing pending is written.

        Everything already acknowledged is on disk, so reopening recovers it; callers still
        waiting get :class:`EngineStopped`. Used after a fatal error and by crash tests.
        """
        if self._commits.closed:
            return
        self._commits.abort(EngineStopped("the engine was aborted"))
        self._snapshots.shutdown()
        await self.log.abort()  # an append in flight finishes or fails; no new one starts

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
        return self._commits.durable_seq

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(events, records)`` with each batch once it is durable (on the event loop).

        ``records`` are the events' framed WAL records, one per event, as written.
        """
        self._commits.subscribe(listener)

    def subscribe_batches(self, listener: BatchListener) -> None:
        """Call ``listener(batch)`` with each batch once it is durable (its events and their transitions).

        A transition carries the whole entry even when it settled and only its record stays in the state.
        """
        self._commits.subscribe_batches(listener)

    def check_running(self) -> None:
        """Raise :class:`EngineStopped` after a fatal error or once closed."""
        self._commits.check_running()

    def _durable(self) -> None:
        self._snapshots.maybe(self._commits.durable_seq)

    def _fatal(self, failure: TollwayError) -> None:
        if self.on_fatal is not None:
            self.on_fatal(failure)

    # -- the command path ------------------------------------------------------------------

    async def execute(self, command: cmd.Command) -> cmd.Outcome:
        """Validate, decide, write and answer one command. Raises on bad input or failure."""
        commits = self._commits
        commits.check_running()
        command = validate(command)
        started = time.perf_counter()
        loaded: dict[str, Loaded] = {}
        while True:
            if commits.pending.size >= self.settings.batch_bytes_max or len(commits.pending.chunks) >= (
                self.settings.batch_records_max
            ):
                await self._room()
            now_ms = self._clock()
            decision = decide(self.state, command, now_ms, self.policy, self._new_id, loaded=loaded)
            if not isinstance(decision, Fetch):
                break
            # A settled entry: read it back, then decide again (the state may have moved on meanwhile;
            # a record changes at most twice, by a void and by the archiver, so this ends).
            loaded[decision.billing_entry_id] = await self._read_back(decision)
        name = type(command).__name__
        if isinstance(decision, Refusal):
            self.observer.refused(name, decision.code.value)
            return decision
        if isinstance(decision, Replay):
            await commits.wait_durable(decision.wal_sequence)
            return _with_stored_response(decision.outcome, loaded)
        batch, outcome = self._write(decision, command, now_ms, loaded)
        await batch.durable
        self.observer.command_done(name, time.perf_counter() - started)
        return outcome

    async def _room(self) -> None:
        """Wait while the pending batch is full (backpressure)."""
        commits = self._commits
        while (
            commits.pending.size >= self.settings.batch_bytes_max
            or len(commits.pending.chunks) >= self.settings.batch_records_max
        ):
            await commits.pending.durable
            commits.check_running()

    async def _read_back(self, fetch: Fetch) -> Loaded:
        """The settled entry ``fetch`` names, folded from its events read back from the log."""
        await self._commits.wait_durable(max(fetch.sequences))
        events = await read_entry_events(self.log, fetch.sequences)
        found = {event.wal_sequence for event in events if event.billing_entry_id == fetch.billing_entry_id}
        ensure(
            len(found) == len(events) and found >= set(fetch.sequences),
            "the log's events at %s are not all of entry %s",
            fetch.sequences,
            fetch.billing_entry_id,
        )
        entry, response_json = fold_entry(events)
        return Loaded(fetch.record, entry, response_json)

    def _write(
        self, decision: Write, command: cmd.Command, now_ms: int, loaded: dict[str, Loaded] | None = None
    ) -> tuple[Batch, cmd.Outcome]:
        """Sequence, apply and enqueue the events of ``decision``. Never awaits."""
        batch = self._commits.pending
        entry_id = decision.billing_entry_id
        read_back = None if loaded is None else loaded.get(entry_id)
        response_json = read_back.response_json if read_back is not None else self.state.responses.get(entry_id)
        entry: Entry | None = None
        previous = None if read_back is None else read_back.entry
        events = [
            Event(self.state.last_sequence + 1 + i, now_ms, decision.billing_entry_id, decision.correlation_id, payload)
            for i, payload in enumerate(decision.payloads)
        ]
        records = [codec.encode(event) for event in events]  # InvalidInput before anything changes
        try:
            for event, record in zip(events, records, strict=True):
                change, entry = apply_answering(self.state, event, previous, entry)
                batch = self._commits.add(event, record, change)
        except TollwayError as exc:  # an invariant broke inside apply: state is suspect
            self._commits.fail(exc)
            raise
        return batch, outcome(self.state, decision, command, entry, response_json)

    # -- snapshots -------------------------------------------------------------------------

    async def snapshot_now(self) -> int:
        """Write a snapshot of the current state; returns its sequence."""
        self._commits.check_running()
        return await self._snapshots.take()

    # -- reads -----------------------------------------------------------------------------

    async def wait_durable(self, seq: int) -> None:
        """Return once the event at ``seq`` (and all before it) is on disk."""
        await self._commits.wait_durable(seq)

    async def export_state(self) -> State:
        """A detached copy of the state, consistent at one sequence, once that sequence is durable.

        For rebuilding projections: the copy is taken in one step on the event loop (so no
        command lands halfway through it; entries are immutable and shared) and its indexes
        are rebuilt in a thread.
        """
        self._commits.check_running()
        frozen = self.state.freeze()
        await self._commits.wait_durable(frozen.last_sequence)
        return await asyncio.to_thread(State.from_snapshot, frozen)

    def balance(self, account_id: str) -> Account:
        """A copy of the account's balances (zeros for an unknown account)."""
        account = self.state.account(account_id)
        return account.copy()

    async def read_balance(self, account_id: str) -> Account:
        """The account's balances, once everything they reflect is durable."""
        await self._commits.wait_durable(self.state.last_sequence)
        return self.balance(account_id)

    async def get_entry(self, billing_entry_id: str) -> Entry | None:
        """An entry, once the state it reflects is durable."""
        found = await self.read_entry(billing_entry_id)
        return None if found is None else found[0]

    async def read_entry(self, billing_entry_id: str) -> tuple[Entry, str | None] | None:
        """An entry and its stored response, once durable; a settled one is read back from the log.

        None for an unknown entry (never made, or archived past the retention).
        """
        entry = self.state.entries.get(billing_entry_id)
        if entry is not None:
            await self._commits.wait_durable(entry.wal_sequence)
            return entry, self.state.responses.get(billing_entry_id)
        record = self.state.settled.get(billing_entry_id)
        if record is None:
            return None
        self._commits.check_running()
        loaded = await self._read_back(Fetch(billing_entry_id, record.seqs, record))
        return loaded.entry, loaded.response_json

    async def peek_entry(self, billing_entry_id: str) -> Entry | None:
        """An entry as it is now, without waiting for durability; a settled one is read back from the log."""
        entry = self.state.entries.get(billing_entry_id)
        if entry is not None or billing_entry_id not in self.state.settled:
            return entry
        found = await self.read_entry(billing_entry_id)
        return None if found is None else found[0]


def _with_stored_response(result: cmd.Outcome, loaded: dict[str, Loaded]) -> cmd.Outcome:
    """A replay of a settled entry answers with the stored response read back with it."""
    if isinstance(result, cmd.EntryResult):
        read_back = loaded.get(result.entry.billing_entry_id)
        if read_back is not None:
            return msgspec.structs.replace(result, response_json=read_back.response_json)
    return result


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
        state.settled.catch_up()  # index what replay settled now, not in the first command
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
