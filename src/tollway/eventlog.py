"""The log interface: what the engine needs of a durable, ordered log of framed WAL records.

The engine (through :mod:`tollway.group_commit`) is the log's only writer. It appends
group-commit batches, one at a time, and answers a batch's callers only once the log says the
batch is durable. Everything the engine knows of its storage is this interface, so another log
can stand behind it: today the file WAL (:class:`tollway.wal.file_log.FileLog`, segments on a
local disk synced by a helper process or an I/O thread); in cluster mode a PostgreSQL table per
shard, where one batch is one transaction.

The contract, for every implementation:

- ``append(records, first_seq)`` takes whole framed records (:func:`tollway.wal.codec.encode`)
  with consecutive sequences starting at ``first_seq``, and returns an awaitable that completes
  once all of them are durable. Calls never overlap: the next batch is appended only after the
  previous one's awaitable completed. It may be a plain ``async def``; a log that can start the
  write at once (the file WAL) returns a future instead, which the group commit awaits as is.
- When a batch could not be made durable, the awaitable raises a
  :class:`~tollway.core.errors.TollwayError` (:class:`~tollway.core.errors.WalIOFailure`, or a
  fencing error when another writer took the log over). The engine then stops (fail-stop): it
  appends nothing more, and a restart recovers from what the log holds. Whether the failed batch
  itself is there after the restart is not known, and either is correct: none of its callers
  was answered.
- ``read(after_seq, limit)`` returns at most ``limit`` durable events after ``after_seq``, in
  order; an empty list at the end of the log.
- ``close()`` lets an append in flight finish, makes everything appended durable and releases
  the log (the file lock, the lease); ``abort()`` stops as a crash would, releasing it without
  waiting for more than an append already in flight.

Recovery is not part of the interface: each log folds its own snapshot and records into a
:class:`~tollway.core.state.State` before the engine starts (the file WAL: ``Engine.start``;
PostgreSQL: ``tollway.cluster.shard_log``). A log that keeps snapshots itself gives the engine a
:class:`SnapshotStore`; without one the engine writes snapshot files.
This module knows nothing of files, sockets, SQL or asyncio's machinery.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Final, Protocol

from tollway.core.events import BillingCommit, Event
from tollway.core.history import response_after


class EventLog(Protocol):
    """A durable, ordered log of framed WAL records with one writer: the engine."""

    def append(self, records: Sequence[bytes], first_seq: int) -> Awaitable[None]:
        """Append one batch; the awaitable completes once it is durable, or raises if it cannot be."""
        ...

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """At most ``limit`` durable events after ``after_seq``, in sequence order."""
        ...

    async def close(self) -> None:
        """Finish the append in flight, make everything durable, release the log."""
        ...

    async def abort(self) -> None:
        """Stop as a crash would: release the log without finishing anything but the append in flight."""
        ...


READ_RUN_MAX: Final = 64
"""Most sequences :func:`read_sequences` asks the log for in one read (a run of consecutive ones)."""


async def read_sequences(log: EventLog, sequences: Sequence[int]) -> list[Event]:
    """The durable events at ``sequences`` (ascending), read in runs of consecutive sequences.

    What reads a settled entry back: its few events (creation, commit, stored response, settlement)
    are named by their sequences in its idempotency record.
    """
    found: list[Event] = []
    index = 0
    while index < len(sequences):
        first = end = sequences[index]
        index += 1
        while index < len(sequences) and sequences[index] == end + 1 and end - first + 1 < READ_RUN_MAX:
            end = sequences[index]
            index += 1
        found += await log.read(first - 1, end - first + 1)
    return found


async def read_entry_events(log: EventLog, sequences: Sequence[int]) -> list[Event]:
    """The events of one entry at ``sequences``, and its stored response: the event right after its commit."""
    events = await read_sequences(log, sequences)
    commit = next((event for event in events if isinstance(event.payload, BillingCommit)), None)
    if commit is not None and commit.wal_sequence + 1 not in sequences:
        response = response_after(commit, next(iter(await log.read(commit.wal_sequence, 1)), None))
        if response is not None:
            events = sorted([*events, response], key=lambda event: event.wal_sequence)
    return events


class SnapshotStore(Protocol):
    """Where a log that is not the file WAL keeps the engine's snapshots (PostgreSQL rows in a cluster)."""

    async def write_snapshot(self, seq: int, chunks: Sequence[bytes]) -> None:
        """Store the state after ``seq``, given as the msgpack body in pieces (``wal.snapshot.snapshot_chunks``)."""
        ...
