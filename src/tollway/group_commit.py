"""Group commit: the engine's records, batched onto a log, and the futures their callers await.

The engine hands over each event as soon as it is applied (:meth:`GroupCommit.add`, never
awaiting). Records collect in the *pending* batch; at most one batch is *in flight* on the log
(:class:`tollway.eventlog.EventLog`). When the log says a batch is durable, every caller of the
batch is answered at once (one shared future), listeners see its events, and the pending batch
starts — but no sooner than the sync gap after the previous one started, unless it already
holds :data:`SYNC_GAP_BATCH_RECORDS` records or the log was idle (``docs/architecture.md``
explains the gap and its measurements).

A failed append is fatal (fail-stop): every waiting caller gets the error, nothing more is
appended, and the engine is told once. This module knows nothing of commands, money or files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from tollway.core.errors import EngineStopped, TollwayError, WalIOFailure
from tollway.core.events import Event
from tollway.core.observer import Observer
from tollway.core.state import Transition
from tollway.eventlog import EventLog

log = logging.getLogger("tollway.engine")

SYNC_GAP_BATCH_RECORDS: Final = 32
"""A batch holding this many records starts at once, sync gap or not (measured: ``bench/README.md``)."""

Listener = Callable[[list[Event], list[bytes]], None]
BatchListener = Callable[["Batch"], None]


class _Durable(asyncio.Future[None]):
    """A batch's durability, awaited by every caller of the batch; no caller can cancel it.

    A caller cancelled while it waits gets ``CancelledError`` once the batch is durable (its
    command is written either way, as it already joined the batch). This replaces an
    ``asyncio.shield`` per caller, which cost ~2 µs per command.
    """

    def cancel(self, msg: object = None) -> bool:  # noqa: ARG002 - the signature of Future.cancel
        """Refuse: the future belongs to all of the batch's callers."""
        return False


class Batch:
    """Records waiting for one append, and the future their callers wait on."""

    __slots__ = ("chunks", "durable", "events", "first_seq", "last_seq", "size", "transitions")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.first_seq = 0
        self.last_seq = 0
        self.events: list[Event] = []
        self.transitions: list[tuple[Event, Transition]] = []
        self.durable: asyncio.Future[None] = _Durable(loop=loop)


class GroupCommit:
    """Batches of records on one log: at most one in flight, the next one collecting meanwhile."""

    def __init__(
        self,
        event_log: EventLog,
        observer: Observer,
        *,
        durable_seq: int,
        sync_gap_s: float,
        on_durable: Callable[[], None],
        on_failure: Callable[[TollwayError], None],
    ) -> None:
        self._log = event_log
        self._observer = observer
        self._loop = asyncio.get_running_loop()
        self._on_durable = on_durable
        self._on_failure = on_failure
        self.pending = Batch(self._loop)
        self.inflight: Batch | None = None
        self.durable_seq = durable_seq  # the highest sequence known to be durable
        self._sync_gap_s = sync_gap_s
        self._next_write_at = 0.0  # perf_counter: the next batch starts no sooner (the sync gap)
        self._gap_timer: asyncio.TimerHandle | None = None
        self._listeners: list[Listener] = []
        self._batch_listeners: list[BatchListener] = []
        self.failure: TollwayError | None = None
        self.closed = False

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(events, records)`` with each batch once it is durable."""
        self._listeners.append(listener)

    def subscribe_batches(self, listener: BatchListener) -> None:
        """Call ``listener(batch)`` with each batch once it is durable: its events with their transitions."""
        self._batch_listeners.append(listener)

    def add(self, event: Event, record: bytes, change: Transition | None) -> Batch:
        """Add ``event`` and its framed ``record`` to the pending batch, which starts soon. Never awaits.

        The caller frames the record before it applies the event, so a record the log would
        refuse (:class:`~tollway.core.errors.RecordTooLarge`) changes nothing.
        """
        batch = self.pending
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
        return batch

    async def wait_durable(self, seq: int) -> None:
        """Return once ``seq`` is durable; raise :class:`EngineStopped` if it never will be."""
        while seq > self.durable_seq:
            self.check_running()
            batch = self.inflight if self.inflight is not None and seq <= self.inflight.last_seq else self.pending
            await batch.durable

    def check_running(self) -> None:
        """Raise :class:`EngineStopped` after a fatal error or once closed."""
        if self.failure is not None:
            raise EngineStopped(f"the engine stopped after a fatal error: {self.failure}") from self.failure
        if self.closed:
            raise EngineStopped("the engine is closed")

    def _kick(self) -> None:
        """Start the pending batch unless a batch is in flight or the sync gap has not passed."""
        if not self._may_write():
            return
        if self._sync_gap_s:
            wait_s = self._next_write_at - time.perf_counter()
            if wait_s > 0 and len(self.pending.chunks) < SYNC_GAP_BATCH_RECORDS:
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
        """Whether a pending batch could start now: records wait, none is in flight, the engine runs."""
        return self.inflight is None and bool(self.pending.chunks) and self.failure is None and not self.closed

    def _start_write(self) -> None:
        """Append the pending batch; the next batch collects meanwhile (and waits out the gap)."""
        batch = self.inflight = self.pending
        self.pending = Batch(self._loop)
        started = time.perf_counter()
        self._next_write_at = started + self._sync_gap_s
        future = asyncio.ensure_future(self._log.append(batch.chunks, batch.first_seq), loop=self._loop)
        future.add_done_callback(lambda f: self._written(batch, f, started))

    def _written(self, batch: Batch, future: asyncio.Future[None], started: float) -> None:
        self.inflight = None
        exc = future.exception()
        if exc is not None:
            self.fail(exc, batch)
            return
        if self.failure is not None:  # stopped meanwhile; this batch's waiters already have the error
            return
        self.durable_seq = batch.last_seq
        batch.durable.set_result(None)
        self._observer.wal_batch(len(batch.chunks), batch.size, time.perf_counter() - started)
        if batch.transitions:
            self._observer.transitioned(batch.transitions)
        for batch_listener in self._batch_listeners:
            batch_listener(batch)
        for listener in self._listeners:
            listener(batch.events, batch.chunks)
        if self.pending.chunks:
            self._kick()
        if not self.closed:
            self._on_durable()

    def fail(self, exc: BaseException, failed: Batch | None = None) -> None:
        """Fail-stop: refuse everything from now on and wake every waiter with the error."""
        if self.failure is not None:
            return
        log.critical("engine stopped: %s", exc)
        self.failure = exc if isinstance(exc, TollwayError) else WalIOFailure(str(exc))
        for batch in (failed, self.inflight, self.pending):
            if batch is not None and not batch.durable.done():
                batch.durable.set_exception(self.failure)
                batch.durable.exception()  # mark retrieved: not every batch has a waiter
        self._on_failure(self.failure)

    def close(self) -> None:
        """Append nothing more (what is durable stays answered)."""
        self.closed = True

    def abort(self, stopped: EngineStopped) -> None:
        """Close at once, as a crash would: callers of the pending batch get ``stopped``."""
        self.closed = True
        if not self.pending.durable.done():
            self.pending.durable.set_exception(stopped)
            self.pending.durable.exception()
