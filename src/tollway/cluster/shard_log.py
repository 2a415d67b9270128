"""A shard's engine on the log in PostgreSQL: the event log, its snapshots, and recovery.

:class:`ShardLog` is the engine's log interface (:class:`tollway.eventlog.EventLog`) over one
shard's :class:`~tollway.pg.log.PgLog`, written under one lease epoch:

- ``append`` is ``PgLog.append(records, first_seq, epoch)``: one fenced transaction per
  group-commit batch, durable when it returns. A refused fence raises
  :class:`~tollway.core.errors.ShardFenced`, which the group commit turns into fail-stop *for
  this shard*: the batch's callers get the error (the API answers 503 ``shard_moved``), the
  engine accepts nothing more, and the node drops the shard (``on_fenced``).
- snapshots are rows (:class:`~tollway.eventlog.SnapshotStore`), in the file WAL's snapshot
  bytes, written under the same fence; older ones are pruned, events never are.

:func:`recover_state` folds the newest snapshot row and the records after it into a
:class:`~tollway.core.state.State`, checking that the log ends where the lease row says;
:func:`start_shard_engine` does that and returns an :class:`~tollway.engine.Engine` whose entry
ids carry the shard (:class:`~tollway.core.shard.ShardIds`). Leases are not taken or released
here (:mod:`tollway.cluster.membership` does that): a log is given its epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Final

from tollway.config import Settings
from tollway.core.errors import LogCorrupt, ShardFenced
from tollway.core.events import Event
from tollway.core.observer import NoopObserver, Observer
from tollway.core.shard import ShardIds
from tollway.core.state import State
from tollway.engine import Clock, Engine, system_clock_ms
from tollway.pg.log import READ_LIMIT_MAX, PgLog
from tollway.wal.snapshot import decode_snapshot, frame_snapshot

log = logging.getLogger("tollway.cluster")

RECOVERY_PAGE_RECORDS: Final = 5_000
"""Records read per statement while a shard recovers."""
SNAPSHOTS_KEPT: Final = 2
"""Snapshot rows kept per shard (the newest; events are never deleted)."""


class ShardLog:
    """One shard's log in PostgreSQL, written under lease ``epoch``; see the module docstring."""

    def __init__(self, pg_log: PgLog, epoch: int, *, on_fenced: Callable[[ShardFenced], None] | None = None) -> None:
        self.pg_log = pg_log
        self.epoch = epoch
        self.on_fenced = on_fenced
        self._inflight: asyncio.Task[None] | None = None

    @property
    def shard(self) -> int:
        """The shard this log belongs to."""
        return self.pg_log.shard

    def append(self, records: Sequence[bytes], first_seq: int) -> asyncio.Task[None]:
        """Store one batch in one fenced transaction; the task completes once it is durable."""
        self._inflight = asyncio.ensure_future(self._append(list(records), first_seq))
        return self._inflight

    async def _append(self, records: list[bytes], first_seq: int) -> None:
        try:
            await self.pg_log.append(records, first_seq, self.epoch)
        except ShardFenced as exc:
            log.warning("shard %d: batch %d… refused by the fence: %s", self.shard, first_seq, exc)
            if self.on_fenced is not None:
                self.on_fenced(exc)
            raise

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """At most ``limit`` durable events after ``after_seq`` (committed rows are durable)."""
        if limit <= 0:
            return []
        return await self.pg_log.read(after_seq, min(limit, READ_LIMIT_MAX))

    async def write_snapshot(self, seq: int, chunks: Sequence[bytes]) -> None:
        """Store the state after ``seq`` as a snapshot row (fenced), then prune older rows."""
        body = await asyncio.to_thread(frame_snapshot, seq, chunks)
        await self.pg_log.write_snapshot(seq, body, epoch=self.epoch)
        await self.pg_log.prune_snapshots(SNAPSHOTS_KEPT, epoch=self.epoch)

    async def close(self) -> None:
        """Let an append in flight finish; the lease is released by the node, not here."""
        await self._settle()

    async def abort(self) -> None:
        """Stop as a crash would: only an append already in flight finishes (or fails)."""
        await self._settle()

    async def _settle(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._inflight)


async def recover_state(pg_log: PgLog, *, page_records: int = RECOVERY_PAGE_RECORDS) -> State:
    """The shard's state: its newest snapshot row, then every record after it folded in order.

    Raises :class:`LogCorrupt` when a snapshot row does not decode or the records end before
    the lease row's ``last_seq`` (a log that lost acknowledged records is never served).
    """
    stored = await pg_log.load_newest()
    if stored is None:
        state = State()
    else:
        try:
            _, snap = decode_snapshot(stored.body)
        except ValueError as exc:
            raise LogCorrupt(f"shard {pg_log.shard}: the snapshot at {stored.seq} is not sound: {exc}") from exc
        state = await asyncio.to_thread(State.from_snapshot, snap)
    end_seq = await pg_log.last_seq()
    while state.last_sequence < end_seq:
        events = await pg_log.read(state.last_sequence, page_records)
        if not events:
            raise LogCorrupt(f"shard {pg_log.shard}: the log ends at {state.last_sequence}, the lease says {end_seq}")
        for event in events:
            state.apply(event)
    return state


async def start_shard_engine(
    pg_log: PgLog,
    epoch: int,
    settings: Settings,
    *,
    clock: Clock = system_clock_ms,
    observer: Observer | None = None,
    random80: Callable[[], int] | None = None,
    on_fenced: Callable[[ShardFenced], None] | None = None,
) -> Engine:
    """Recover shard ``pg_log.shard`` from PostgreSQL and return its engine, writing under ``epoch``."""
    state = await recover_state(pg_log)
    shard_log = ShardLog(pg_log, epoch, on_fenced=on_fenced)
    ids = ShardIds(clock, random80 if random80 is not None else _random80, pg_log.shard)
    return Engine(
        settings,
        state,
        shard_log,
        clock=clock,
        observer=observer or NoopObserver(),
        random80=_random80,  # unused: new_id makes every id
        identity=f"shard-{pg_log.shard}",
        new_id=ids.new,
        snapshots=shard_log,
    )


def _random80() -> int:
    return int.from_bytes(os.urandom(10), "big")
