"""Reading WAL segments: listing, scanning, torn-tail analysis and verification. Read-only.

Segments are files ``wal-<first sequence, 20 digits>.seg`` in ``<data_dir>/wal/``, so a plain
sort orders them. Each starts with :data:`~tollway.wal.codec.SEGMENT_MAGIC` followed by
records (see :mod:`tollway.wal.codec`).

The one subtle rule lives here: a record that fails its framing or checksum is a **torn tail**
only if it is in the last segment and no valid record follows it anywhere in that segment;
then the log ends at the last valid record. A bad record *followed by a valid one* — or a bad
record in any earlier segment — is **corruption**, and whoever reads the log must refuse to
go on, naming the segment and byte offset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tollway.core.errors import WalCorrupt, WalRecordProblem, WalUnsupported
from tollway.core.events import Event
from tollway.wal import codec

_NAME_RE: Final = re.compile(r"wal-(\d{20})\.seg")
_BODY_PREFIX: Final = b'{"schema_version":'


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """One segment file and the sequence its first record must carry."""

    path: Path
    first_seq: int

    @property
    def name(self) -> str:
        """The file name, used in messages."""
        return self.path.name


def segment_name(first_seq: int) -> str:
    """The file name of the segment whose first record is ``first_seq``."""
    return f"wal-{first_seq:020d}.seg"


def list_segments(wal_dir: Path) -> list[SegmentFile]:
    """The segments in ``wal_dir``, ordered by first sequence."""
    if not wal_dir.is_dir():
        return []
    found = []
    for path in wal_dir.iterdir():
        match = _NAME_RE.fullmatch(path.name)
        if match:
            found.append(SegmentFile(path, int(match.group(1))))
    return sorted(found, key=lambda seg: seg.first_seq)


@dataclass(frozen=True, slots=True)
class Tail:
    """Where a segment's valid records end, and what follows them."""

    valid_end: int  # byte offset just past the last valid record
    last_seq: int  # sequence of the last valid record (first_seq - 1 when none)
    size: int  # file size
    stop: codec.ScanEnd

    @property
    def clean(self) -> bool:
        """The segment ends exactly at a record boundary."""
        return self.stop.stop is None


def next_valid_record(buf: bytes, after: int) -> int | None:
    """Offset of the first record after ``after`` whose frame and checksum are valid, if any.

    Every body this codec writes starts with ``{"schema_version":``, so candidates are found
    with a byte search rather than by trying every offset.
    """
    pos = buf.find(_BODY_PREFIX, after + codec.HEADER_BYTES + 1)
    while pos != -1:
        start = pos - codec.HEADER_BYTES
        box: list[codec.ScanEnd] = []
        if start > after and next(codec.scan(buf, start, None, box), None) is not None:
            return start
        pos = buf.find(_BODY_PREFIX, pos + 1)
    return None


def _check_magic(segment: SegmentFile, buf: bytes, is_last: bool) -> None:
    magic = codec.SEGMENT_MAGIC
    if buf[: len(magic)] == magic:
        return
    # A last segment shorter than its header was cut while being created: nothing in it.
    if is_last and len(buf) < len(magic) and magic.startswith(buf):
        return
    raise WalCorrupt("segment does not start with the tollway WAL header", segment=segment.name, offset=0)


def scan_segment(
    segment: SegmentFile,
    *,
    is_last: bool,
    sink: Callable[[Event], object] | None = None,
) -> tuple[list[tuple[int, Event]], Tail]:
    """Every valid record of ``segment`` (offset, event) and its :class:`Tail`.

    With ``sink`` each event is handed to it as it is read and the list stays empty (replay
    of a large segment then holds one event at a time). Raises :class:`WalCorrupt` when a bad
    record is not a torn tail (see the module docstring).
    """
    data = segment.path.read_bytes()
    _check_magic(segment, data, is_last)
    records: list[tuple[int, Event]] = []
    last_seq = segment.first_seq - 1
    offset = min(len(codec.SEGMENT_MAGIC), len(data))
    while True:  # a run of records at a time (codec.MAX_RUN_RECORDS): decoding and folding run in tight loops
        events: list[Event] = []
        if sink is None:
            offsets: list[int] = []
            end = codec.decode_run(data, offset, last_seq + 1, events, offsets=offsets)
            records.extend(zip(offsets, events, strict=True))
        else:
            end = codec.decode_run(data, offset, last_seq + 1, events)
            for event in events:
                sink(event)
        if events:
            last_seq = events[-1].wal_sequence
        if end.stop is not None or end.offset >= len(data):
            break
        offset = end.offset
    tail = Tail(end.offset, last_seq, len(data), end)
    if end.stop is codec.Stop.UNSUPPORTED:
        raise WalUnsupported(end.detail, segment=segment.name, offset=end.offset)
    if end.stop is not None:
        corrupt = not is_last or end.stop is codec.Stop.BAD_SEQUENCE or next_valid_record(data, end.offset) is not None
        if corrupt:
            detail = f": {end.detail}" if end.detail else ""
            raise WalCorrupt(f"{end.stop.value}{detail}", segment=segment.name, offset=end.offset)
    return records, tail


def iter_events(wal_dir: Path, from_seq: int = 1) -> Iterator[Event]:
    """Every event with sequence ≥ ``from_seq``, checking continuity across segments.

    Read-only: a torn tail in the last segment simply ends the iteration.
    """
    segments = list_segments(wal_dir)
    start_index = 0
    for index, segment in enumerate(segments):
        if segment.first_seq <= from_seq:
            start_index = index
    expected: int | None = None
    for index in range(start_index, len(segments)):
        segment = segments[index]
        if expected is not None:
            check_start(segment, expected)
        records, tail = scan_segment(segment, is_last=index == len(segments) - 1)
        for _, event in records:
            if event.wal_sequence >= from_seq:
                yield event
        expected = tail.last_seq + 1


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``tollway wal verify`` found."""

    segments: int
    records: int
    last_seq: int
    torn_tail: str | None  # "segment at offset" of a torn tail that recovery would cut
    problem: WalRecordProblem | None

    @property
    def ok(self) -> bool:
        """No corruption (a torn tail is not corruption: recovery cuts it)."""
        return self.problem is None


def verify(wal_dir: Path, sink: Callable[[Event], object] | None = None) -> VerifyReport:
    """Read every segment and check every record, without changing anything.

    With ``sink`` every valid event is also handed to it in order, so a caller that needs to
    fold the log (the audit) reads it once.
    """
    segments = list_segments(wal_dir)
    records = 0
    last_seq = 0
    torn: str | None = None
    for index, segment in enumerate(segments):
        try:
            check_start(segment, last_seq + 1)
            _, tail = scan_segment(segment, is_last=index == len(segments) - 1, sink=sink or _count)
        except WalRecordProblem as exc:
            return VerifyReport(len(segments), records, last_seq, torn, exc)
        records += tail.last_seq - last_seq
        last_seq = tail.last_seq
        if tail.stop.stop is not None:
            torn = f"{segment.name} at byte offset {tail.valid_end} ({tail.stop.stop.value})"
    return VerifyReport(len(segments), records, last_seq, torn, None)


def _count(event: Event) -> None:
    """A sink that keeps nothing: verify only counts."""


def check_start(segment: SegmentFile, expected: int) -> None:
    """Segments follow each other without a gap or an overlap."""
    if segment.first_seq != expected:
        raise WalCorrupt(f"segment starts at {segment.first_seq}, expected {expected}", segment=segment.name, offset=0)
