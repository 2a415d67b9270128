"""The file WAL behind the engine's log interface (:class:`tollway.eventlog.EventLog`).

A batch is written and synced one of two ways. With the sync helper (:mod:`tollway.wal.syncer`,
the default) the event loop writes the batch itself (``os.write`` into the page cache) and the
helper process syncs the segment with ``fdatasync``, so the sync never waits for this process's GIL.
Without it (``wal_syncer = thread``, or durability ``none``), the log's I/O thread does both.
Either way :meth:`FileLog.append` returns a future that completes once the batch is durable or
fails with :class:`~tollway.core.errors.WalIOFailure`.

The log owns the data directory's lock for its lifetime: :meth:`close` and :meth:`abort`
release it. Reads (:meth:`read`) run in a thread through a sparse index of the segment files
(:mod:`tollway.wal.read_index`) and stop at the last batch known to be durable, so they never
return a record that a crash could still take back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tollway.core.errors import WalIOFailure
from tollway.core.events import Event
from tollway.wal.log import DirectoryLock, WalWriter
from tollway.wal.read_index import ReadIndex
from tollway.wal.syncer import SyncProcess


class FileLog:
    """WAL segments in one directory, appended by the engine's event loop or the log's I/O thread."""

    def __init__(self, writer: WalWriter, lock: DirectoryLock, *, durable_seq: int, syncer: SyncProcess | None) -> None:
        self.writer = writer
        self.syncer = syncer  # None: the I/O thread writes and syncs (or durability is none)
        self._lock = lock
        self._durable_seq = durable_seq  # the last batch before the one in flight (appends never overlap)
        self._appended: tuple[asyncio.Future[None] | None, int] = (
            None,
            durable_seq,
        )  # the latest batch, its last sequence
        self._loop = asyncio.get_running_loop()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-wal")
        self._index = ReadIndex(writer.wal_dir)  # reads seek to a sparse index instead of scanning segments

    @classmethod
    def start(cls, writer: WalWriter, lock: DirectoryLock, *, durable_seq: int, sync_helper: bool) -> FileLog:
        """Take over ``writer`` (positioned after the last valid record) and ``lock``; start the helper if asked."""
        syncer = None
        if sync_helper:
            try:
                syncer = SyncProcess.start()
            except BaseException:
                writer.close()
                raise
        return cls(writer, lock, durable_seq=durable_seq, syncer=syncer)

    @property
    def wal_dir(self) -> Path:
        """The directory of the segments."""
        return self.writer.wal_dir

    def append(self, records: Sequence[bytes], first_seq: int) -> asyncio.Future[None]:
        """Write ``records`` and sync them; the future completes once they are durable."""
        self._durable_seq = self._appended[1]  # the previous batch completed; had it failed, no append would follow
        data = b"".join(records)
        if self.syncer is None:
            future = self._loop.run_in_executor(self._io, self.writer.write_batch, data, first_seq)
        else:
            future = self._append_and_sync(self.syncer, data, first_seq)
        self._appended = (future, first_seq + len(records) - 1)
        return future

    def _append_and_sync(self, syncer: SyncProcess, data: bytes, first_seq: int) -> asyncio.Future[None]:
        """Write ``data`` here (into the page cache) and have the sync helper make it durable."""
        try:
            self.writer.append(data, first_seq)
        except WalIOFailure as exc:
            failed: asyncio.Future[None] = self._loop.create_future()
            failed.set_exception(exc)
            return failed
        return syncer.sync(self.writer.fd, self.writer.generation)

    def _durable_end(self) -> int:
        """The last sequence known to be durable."""
        latest, last_seq = self._appended
        if latest is not None and latest.done() and not latest.cancelled() and latest.exception() is None:
            return last_seq
        return self._durable_seq

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """At most ``limit`` durable events after ``after_seq`` (read from the segment files in a thread)."""
        end_seq = self._durable_end()

        if after_seq >= end_seq or limit <= 0:
            return []
        return await asyncio.to_thread(self._index.read, after_seq, limit, end_seq)

    async def close(self) -> None:
        """Let a sync in flight finish, sync and close the active segment, release the lock."""
        try:
            if self.syncer is not None:
                await self.syncer.close()
            await asyncio.to_thread(self.writer.close)
            self._io.shutdown(wait=True)
        finally:
            self._lock.release()

    async def abort(self) -> None:
        """Stop at once: a write or sync in flight finishes or fails, no new one starts; release the lock."""
        try:
            self._io.shutdown(wait=True)
            if self.syncer is not None:
                await self.syncer.close()
            await asyncio.to_thread(self.writer.close)
        finally:
            self._lock.release()
