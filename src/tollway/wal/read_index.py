"""Reading a few records by sequence from the segment files, without decoding whole segments.

A settled entry is read back by the sequences of its few events (its idempotency record names
them), so a read must not cost a scan of a 64 MiB segment. :class:`ReadIndex` keeps, per
segment, a sparse list of ``(sequence, byte offset)`` — one pair every
:data:`INDEX_EVERY_RECORDS` records in two machine-integer arrays, 16 bytes per 64 records, so
about 250 KB per million records — built lazily: the first read that reaches a part of a segment
not indexed yet walks that part's record headers once (lengths only: a few milliseconds for a
whole segment), later reads seek to the nearest indexed record before the one they want and
decode from there, checking CRCs and sequences. A segment that grows (the active one) is
indexed further as reads reach its new records.

Only durable records are asked for (the file log bounds every read by its durable sequence),
and a record that is not whole yet simply ends a scan. Everything here runs in the log's
reading thread; one lock guards the index. It knows nothing of entries.
"""

from __future__ import annotations

import bisect
import threading
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tollway.core.errors import WalCorrupt
from tollway.core.events import Event
from tollway.wal import codec
from tollway.wal.segments import SegmentFile, list_segments

INDEX_EVERY_RECORDS: Final = 64
"""One indexed ``(sequence, offset)`` pair per this many records."""
READ_WINDOW_BYTES: Final = 256 << 10
"""Bytes read at a time from an indexed offset; doubled until the records wanted are whole."""


@dataclass(slots=True)
class _Segment:
    """The sparse index of one segment: sequences and their offsets, and how far it was scanned."""

    segment: SegmentFile
    seqs: array[int] = field(default_factory=lambda: array("q"))
    offsets: array[int] = field(default_factory=lambda: array("q"))
    scanned_seq: int = 0  # the last sequence scanned (first_seq - 1 before any)
    scanned_end: int = len(codec.SEGMENT_MAGIC)  # the offset just past it


class ReadIndex:
    """Sparse ``sequence → (segment, offset)`` index of a WAL directory, for reads of a few records."""

    def __init__(self, wal_dir: Path) -> None:
        self.wal_dir = wal_dir
        self._segments: dict[int, _Segment] = {}
        self._lock = threading.Lock()

    def read(self, after_seq: int, limit: int, end_seq: int) -> list[Event]:
        """At most ``limit`` events after ``after_seq``, none past ``end_seq`` (all durable)."""
        first = after_seq + 1
        last = min(end_seq, after_seq + limit)
        found: list[Event] = []
        while first <= last:
            with self._lock:
                index = self._segment_of(first, last)
                if index is None:
                    break
                start_seq, offset = self._nearest(index, first)
            events = _decode_from(index.segment, offset, start_seq, first, last)
            if not events:
                break
            found += events
            first = events[-1].wal_sequence + 1
        return found

    def _segment_of(self, seq: int, end_seq: int) -> _Segment | None:
        """The index of the segment holding ``seq``, walked at least as far as ``seq`` (at most to ``end_seq``)."""
        segments = list_segments(self.wal_dir)
        holder = None
        for segment in segments:
            if segment.first_seq <= seq:
                holder = segment
        if holder is None:
            return None
        index = self._segments.get(holder.first_seq)
        if index is None:
            index = self._segments[holder.first_seq] = _Segment(holder, scanned_seq=holder.first_seq - 1)
        if index.scanned_seq < seq:
            _extend(index, end_seq)
        return index if index.scanned_seq >= seq else None

    @staticmethod
    def _nearest(index: _Segment, seq: int) -> tuple[int, int]:
        """The indexed ``(sequence, offset)`` at or before ``seq``."""
        at = bisect.bisect_right(index.seqs, seq) - 1
        return index.seqs[at], index.offsets[at]


def _extend(index: _Segment, end_seq: int) -> None:
    """Walk the segment's record headers from where its index ends, up to ``end_seq``, indexing as it goes.

    Only lengths are read, not bodies: a segment's records carry consecutive sequences from its
    first, so the walk knows each one's sequence, and a whole segment is indexed in milliseconds.
    Records up to ``end_seq`` are durable, hence whole; the decoding read checks CRCs and sequences.
    """
    with index.segment.path.open("rb") as file:
        file.seek(index.scanned_end)
        data = file.read()
    offset, seq, size = 0, index.scanned_seq, len(data)
    while seq < end_seq and size - offset >= codec.HEADER_BYTES:
        _, length = codec.HEADER.unpack_from(data, offset)
        end = offset + codec.HEADER_BYTES + length
        if not 0 < length <= codec.MAX_RECORD_BYTES or end > size:
            break
        seq += 1
        if (seq - index.segment.first_seq) % INDEX_EVERY_RECORDS == 0:
            index.seqs.append(seq)
            index.offsets.append(index.scanned_end + offset)
        offset = end
    index.scanned_seq, index.scanned_end = seq, index.scanned_end + offset


def _decode_from(segment: SegmentFile, offset: int, start_seq: int, first: int, last: int) -> list[Event]:
    """The events ``first..last`` of ``segment`` (as many as it holds), decoding from ``offset`` (``start_seq``).

    The records before ``first`` are stepped over by their headers (at most
    :data:`INDEX_EVERY_RECORDS` of them), and decoding stops at ``last``: a read costs the few
    records it returns, not the window it reads.
    """
    window = READ_WINDOW_BYTES
    while True:
        with segment.path.open("rb") as file:
            file.seek(offset)
            data = file.read(window)
        skip, seq = _skip_to(data, start_seq, first)
        end: codec.ScanEnd | None = None
        found: list[Event] = []
        if seq == first:
            end = codec.decode_run(data, skip, first, found, limit=max(1, last - first + 1))
        complete = len(data) < window  # read to the end of the file: what is there is all there is
        if (found and found[-1].wal_sequence == last) or complete:
            if not found and end is not None and end.stop is codec.Stop.BAD_CHECKSUM:
                raise WalCorrupt("a record read back is damaged", segment=segment.name, offset=offset + end.offset)
            return found
        window *= 2


def _skip_to(data: bytes, seq: int, first: int) -> tuple[int, int]:
    """The offset in ``data`` (records from ``seq`` on) of record ``first``, and the sequence found there.

    Only headers are read; a record cut off by the window's end stops the walk short of ``first``.
    """
    offset, size = 0, len(data)
    while seq < first and size - offset >= codec.HEADER_BYTES:
        _, length = codec.HEADER.unpack_from(data, offset)
        end = offset + codec.HEADER_BYTES + length
        if end > size:
            break
        offset, seq = end, seq + 1
    return offset, seq
