"""The WAL on disk: the single-writer lock, recovery, and the appending writer.

Opening the log for writing takes an exclusive ``flock`` on ``<data_dir>/wal/LOCK`` for the
life of the process (a second writer fails at once, naming the holder's pid), recovers, and
returns a :class:`WalWriter` positioned after the last valid record.

Recovery reads the segments that follow the snapshot being resumed from. In the last segment a
torn tail (see :mod:`tollway.wal.segments`) is cut off exactly at the end of the last valid
record and the cut is fsynced and reported; anything else that is bad stops startup.

:meth:`WalWriter.append` appends a group-commit batch with ``os.write``; the engine calls it on
its event loop and has the sync helper process ``fdatasync`` the segment
(:mod:`tollway.wal.syncer`). :meth:`WalWriter.write_batch` does both, blocking: the engine's
I/O thread calls it when ``wal_syncer = thread``. A batch is never split between segments: when
it would push the current segment past ``segment_bytes`` a new segment is created first (file
fsynced, then its directory).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tollway.core.errors import WalCorrupt, WalIOFailure, WalLocked
from tollway.core.events import Event
from tollway.wal import codec
from tollway.wal.segments import SegmentFile, check_start, list_segments, scan_segment, segment_name
from tollway.wal.snapshot import fsync_dir

MAX_WAL_FILE_BYTES: Final = 1 << 30
DEFAULT_SEGMENT_BYTES: Final = 64 << 20


class DirectoryLock:
    """An exclusive, process-lifetime ``flock`` on a lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`WalLocked` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise WalLocked(
                    f"another tollway process (pid {holder}) is writing the WAL in {self.path.parent}; "
                    "only one writer may own a data directory"
                ) from exc
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What recovery found: where the log ends and whether a torn tail was cut."""

    last_seq: int
    segment: SegmentFile | None
    end_offset: int
    replayed: int
    torn_tail: str | None


def recover(wal_dir: Path, after_seq: int, apply: Callable[[Event], object], *, truncate: bool = True) -> Recovery:
    """Replay every record after ``after_seq`` through ``apply``; cut a torn tail.

    Raises :class:`WalCorrupt` on corruption, or when the log ends before ``after_seq`` (a
    snapshot newer than the log means the log lost acknowledged records).
    """
    segments = list_segments(wal_dir)
    if not segments:
        if after_seq:
            raise WalCorrupt(f"no WAL segments, but a snapshot is at sequence {after_seq}", segment="-", offset=0)
        return Recovery(0, None, 0, 0, None)
    start = max((i for i, seg in enumerate(segments) if seg.first_seq <= after_seq + 1), default=0)
    last_seq = segments[start].first_seq - 1
    torn: str | None = None

    def sink(event: Event) -> None:
        if event.wal_sequence > after_seq:
            apply(event)

    for index in range(start, len(segments)):
        segment = segments[index]
        check_start(segment, last_seq + 1)
        whole = segment.first_seq > after_seq  # every record of it is after the snapshot: no filter per event
        _, tail = scan_segment(segment, is_last=index == len(segments) - 1, sink=apply if whole else sink)
        last_seq = tail.last_seq
        if not truncate:
            continue
        if tail.stop.stop is not None:
            _cut(segment, tail.valid_end)
            torn = f"cut torn tail of {segment.name} at byte offset {tail.valid_end} ({tail.stop.stop.value})"
        elif tail.size < len(codec.SEGMENT_MAGIC):  # created by a rotation that crashed mid-header
            _cut(segment, 0)
            torn = f"restored the header of {segment.name}, cut short at {tail.size} bytes"
    if last_seq < after_seq:
        raise WalCorrupt(
            f"the log ends at {last_seq}, before the snapshot at {after_seq}", segment=segments[-1].name, offset=0
        )
    end_offset = max(tail.valid_end, len(codec.SEGMENT_MAGIC))
    return Recovery(last_seq, segments[-1], end_offset, last_seq - after_seq, torn)


def _cut(segment: SegmentFile, offset: int) -> None:
    """Truncate ``segment`` to ``offset`` (and restore a header cut short) durably."""
    fd = os.open(segment.path, os.O_RDWR)
    try:
        os.ftruncate(fd, offset)
        if offset < len(codec.SEGMENT_MAGIC):
            os.pwrite(fd, codec.SEGMENT_MAGIC, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


class WalWriter:
    """Appends group-commit batches to the active segment. Used from one thread only."""

    def __init__(self, wal_dir: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, durable: bool = True) -> None:
        self.wal_dir = wal_dir
        self.segment_bytes = min(segment_bytes, MAX_WAL_FILE_BYTES)
        self.durable = durable
        self._fd: int | None = None
        self._generation = 0
        self._size = 0
        self.segment: Path | None = None

    def resume(self, segment: SegmentFile | None, end_offset: int) -> None:
        """Continue appending at ``end_offset`` of ``segment`` (None: no segment yet)."""
        if segment is None:
            return
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        self._generation += 1
        self._size = end_offset
        self.segment = segment.path

    @property
    def fd(self) -> int:
        """The descriptor of the active segment (after the first :meth:`append`)."""
        if self._fd is None:
            raise WalIOFailure("no WAL segment is open")
        return self._fd

    @property
    def generation(self) -> int:
        """Changes whenever :attr:`fd` starts naming another segment."""
        return self._generation

    def write_batch(self, data: bytes, first_seq: int) -> None:
        """Append ``data`` (whole records, the first with ``first_seq``) and make it durable."""
        self.append(data, first_seq)
        if self.durable:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise WalIOFailure(f"WAL sync failed in {self.segment}: {exc}") from exc

    def append(self, data: bytes, first_seq: int) -> None:
        """Append ``data`` (whole records, the first with ``first_seq``) without syncing it.

        The caller makes it durable: ``fdatasync(fd)`` here (:meth:`write_batch`) or in the
        sync helper (:mod:`tollway.wal.syncer`). A new segment is created first when the batch
        would not fit; creating one syncs the previous segment, the new one and the directory.
        """
        try:
            if self._fd is None or (
                self._size > len(codec.SEGMENT_MAGIC) and self._size + len(data) > self.segment_bytes
            ):
                self._rotate(first_seq)
            fd = self._fd
            assert fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._size += len(data)
        except OSError as exc:
            raise WalIOFailure(f"WAL write failed in {self.segment}: {exc}") from exc

    def _rotate(self, first_seq: int) -> None:
        if self._fd is not None:
            if self.durable:
                os.fsync(self._fd)
            os.close(self._fd)
        path = self.wal_dir / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, codec.SEGMENT_MAGIC)
        if self.durable:
            os.fsync(fd)
            fsync_dir(self.wal_dir)
        self._fd, self._size, self.segment = fd, len(codec.SEGMENT_MAGIC), path
        self._generation += 1

    def close(self) -> None:
        """Sync and close the active segment."""
        if self._fd is not None:
            try:
                if self.durable:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
