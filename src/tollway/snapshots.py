"""Snapshots of an engine's state: a cache of the log, taken in the background and on close.

Every ``snapshot_every_events`` durable events the engine asks for a periodic snapshot
(:meth:`Snapshotter.maybe`). The state is copied in one step on the event loop (entries are
immutable and shared, so the copy is cheap), encoded a slice at a time with callers let in
between — in the background at most :data:`SNAPSHOT_BACKGROUND_SHARE` of the loop — and
written by its own thread (temporary file, fsync, rename: :func:`tollway.wal.snapshot.write_snapshot`)
once everything it includes is durable. One that fails (a full disk) is logged and tried again
a whole interval later: the WAL still has everything. :meth:`Snapshotter.close` hurries a
background snapshot and writes a final one.

This module knows nothing of commands or of the log behind the engine: it is handed the state
and a way to wait for durability.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from tollway.core.errors import TollwayError
from tollway.core.state import State
from tollway.eventlog import SnapshotStore
from tollway.wal.snapshot import snapshot_chunks, write_snapshot

log = logging.getLogger("tollway.engine")

SNAPSHOT_SLICE_S: Final = 0.002
"""Longest the snapshot encoder holds the event loop before letting commands in."""
SNAPSHOT_BACKGROUND_SHARE: Final = 0.2
"""Most of the event loop a periodic snapshot's encoder takes (measured: ``bench/README.md``)."""


class Snapshotter:
    """The snapshots of one engine's state."""

    def __init__(
        self,
        state: State,
        wait_durable: Callable[[int], Awaitable[None]],
        directory: Path,
        *,
        every_events: int,
        kept: int,
        durable: bool,
        store: SnapshotStore | None = None,
    ) -> None:
        self._state = state
        self._wait_durable = wait_durable
        self._directory = directory
        self._every_events = every_events
        self._kept = kept
        self._durable = durable
        self._store = store  # None: files in ``directory``; else rows of the log (a shard's in PostgreSQL)
        self._loop = asyncio.get_running_loop()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-snapshot")
        self.sequence = state.last_sequence  # of the newest snapshot written (or recovered from)
        self._tried_seq = state.last_sequence  # when the last periodic snapshot was started
        self.task: asyncio.Task[None] | None = None
        self.closing = False  # close() waits for a background snapshot: it runs at full speed from then on

    def maybe(self, durable_seq: int) -> None:
        """Start a periodic snapshot in the background if one is due and none is running."""
        due = durable_seq - self._tried_seq >= self._every_events
        if due and (self.task is None or self.task.done()):
            self._tried_seq = durable_seq
            self.task = self._loop.create_task(self.periodic())

    async def periodic(self) -> None:
        """In the background; one that fails is logged and tried again a whole interval later, not at once."""
        try:
            await self.take(background=True)
        except (OSError, TollwayError):  # a full disk, a fenced or failed snapshot row: the log has everything
            log.exception("snapshot failed, the next one is due in %d events", self._every_events)

    async def take(self, *, background: bool = False) -> int:
        """Copy the state now; encode it a slice at a time; write it once all it includes is durable."""
        seq, chunks = await self._encode(background)
        await self._wait_durable(seq)
        if self._store is not None:
            await self._store.write_snapshot(seq, chunks)
        else:
            directory, kept, durable = self._directory, self._kept, self._durable
            await self._loop.run_in_executor(
                self._io, lambda: write_snapshot(directory, seq, chunks, keep=kept, durable=durable)
            )
        self.sequence = max(self.sequence, seq)
        self._tried_seq = max(self._tried_seq, seq)
        return self.sequence

    async def _encode(self, background: bool) -> tuple[int, list[bytes]]:
        """A consistent copy of the state, encoded in slices with callers let in between.

        Encoding half a million entries takes a few hundred milliseconds; done in one go on the
        event loop it stalled every command for that long. Each slice takes about two
        milliseconds. In the ``background`` the encoder waits after each slice so that it takes
        at most :data:`SNAPSHOT_BACKGROUND_SHARE` of the loop, until :meth:`close` waits for it;
        otherwise (on close, on request) it only lets waiting callbacks run between slices.
        """
        pause_per_busy = 1 / SNAPSHOT_BACKGROUND_SHARE - 1 if background else 0.0
        frozen = self._state.freeze()
        chunks: list[bytes] = []
        since_yield = time.perf_counter()
        for chunk in snapshot_chunks(frozen):
            chunks.append(chunk)
            busy_s = time.perf_counter() - since_yield
            if busy_s > SNAPSHOT_SLICE_S:
                await asyncio.sleep(0 if self.closing else busy_s * pause_per_busy)
                since_yield = time.perf_counter()
        return frozen.last_sequence, chunks  # framed (checksummed) by the writing thread

    async def close(self) -> None:
        """Let a background snapshot finish at full speed, then write a final one if the state moved on."""
        if self.task is not None:
            self.closing = True
            await self.task
        if self._state.last_sequence > self.sequence:
            await self.take()

    def shutdown(self) -> None:
        """Stop the writing thread (a write in progress finishes first)."""
        self._io.shutdown(wait=True)
