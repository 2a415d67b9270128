"""The packed table of settled entries: a fixed-size row per entry, two open-addressing indexes. Pure.

Once an entry settles (COMMITTED, FINALIZE_ACKED, RELEASED, VOIDED) memory keeps only what
idempotency, reads and expiry need, as one :data:`ROW` of :data:`ROW_BYTES` bytes in a
``bytearray`` — no Python object per entry:

- the entry id, exactly: a ULID is 128 bits (an id that is not a ULID, which the engine never
  makes, is kept in a small dict beside the rows);
- a 64-bit hash of its request key and a 32-bit hash of its account — *never* trusted alone:
  a caller confirms a match against the entry read back from the log (:mod:`tollway.core.history`),
  so a hash collision costs one more read, never someone else's answer;
- its state, what a COMMITTED charge may still refund, when it last changed, and the sequences
  of its events (the first in full, up to four more as 32-bit distances from it; a longer or
  wider list goes to a small dict).

Rows are appended in the order entries settle (a void moves its row to the end), so the oldest
are at the front: expiry scans from there and stops at the first row too young, and removed
rows are cut off the front in one ``del`` once they are as many as the live ones. Two indexes
map an entry id and a request-key hash to a row by its *absolute* number (mod 2³²), so cutting
the front never touches them. Each is :data:`SEGMENTS` open-addressing arrays (``array('I')``,
linear probing, at most two thirds full, deletion by backward shift, so no tombstones), chosen by
the low bits of the hash: a segment doubles on its own, so growing costs a pause of one
segment's rows (about 10,000 at 10M entries), never one of the whole table. Rows appended
soon after a read (live work: commands read, their settlements append, a group of commits at a
time) go in at once; rows appended long after any read (a replay: hundreds of thousands) go in
when the table is next read, each segment growing once. Both end in the same bytes. That is 69
bytes of row plus 12–24 bytes of indexes per entry (about 83 in all at 10M entries).

:meth:`SettledTable.to_bytes` / :meth:`SettledTable.from_bytes` copy the buffers as they are: a
snapshot holds no request keys and recovery creates no object per entry. Every change is a
deterministic function of the calls made, so a table rebuilt by a full replay equals, byte for
byte, one loaded from a snapshot and brought forward.
"""

from __future__ import annotations

import bisect
import hashlib
import operator
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from typing import Final

import msgspec

from tollway.core.errors import InvariantViolation, ensure
from tollway.core.ids import encode_ulid
from tollway.core.lifecycle import EntryState

ROW: Final = struct.Struct("<16sQIQqBQIIII")
"""id (ULID, 16 bytes big-endian), request-key hash, account hash, updated_at_ms, charged_micro,
state code (bit 7: the id is not a ULID), first sequence, four distances (0: none)."""
ROW_BYTES: Final = ROW.size
_REQ: Final = struct.Struct("<Q")  # the request-key hash, at offset 16
_REQ_AT: Final = 16
_HALVES: Final = struct.Struct(">QQ")  # the id's two halves, at offset 0
_ID_COLUMN: Final = struct.Struct(">QQ53x")  # a row's id as its two halves (iterating rows)
_KEY_COLUMNS: Final = struct.Struct("<16xQ20xB24x")  # a row's request-key hash and state code (iterating rows)
_GOLDEN: Final = 0x9E3779B97F4A7C15  # 2⁶⁴ over the golden ratio, odd: _mix's multiplier
_STATE_AT: Final = 44
_EMPTY: Final = 0xFFFFFFFF
_MASK32: Final = 0xFFFFFFFF
_MASK64: Final = (1 << 64) - 1
_WIDE: Final = 0xFFFFFFFF  # first distance: the sequences are in the wide dict
_ODD: Final = 0x80  # state bit: the id is in the odd-id dict
SEGMENTS: Final = 1024
"""Open-addressing arrays per index, each growing on its own (by the hash's low bits)."""
_SEG_BITS: Final = 10
_SEG_MASK: Final = SEGMENTS - 1
_BITS_MIN: Final = 5
"""A new segment's size: 32 slots (an empty table holds 128 KiB per index), so a table growing from
empty skips the five doublings that cost most per row moved. A snapshot's smaller segments still load."""
_BITS_MAX: Final = 32
_SMALL_CATCH_UP: Final = 16  # rows caught up one at a time below this, in two passes above
_EAGER_AFTER_READ: Final = 1024
"""Rows appended after a read that go into the indexes at once: live work settles bursts (a group of
commits with no reserve between them) a read is followed by; a replay, which reads nothing, defers."""
_CUT_MIN_ROWS: Final = 1024
_ASKED_MAX: Final = 4096  # request-key hashes kept between a reserve's lookup and its settlement, at most
_HEADER: Final = struct.Struct("<4sQQQQ")  # magic, base, head, tail, live; then each segment's bits
_MAGIC: Final = b"STB2"
_HEADER_V1: Final = struct.Struct("<4sQQQQBB")  # magic, base, head, tail, live, id bits, request bits
_MAGIC_V1: Final = b"STB1"  # one array per index: its rows are loaded and indexed anew
_CODES: Final = tuple(EntryState)
_CODE: Final = {state: code for code, state in enumerate(_CODES)}
_SEQS_MAX: Final = 5
_DEAD: Final = 0x7F  # state code of a removed row
_WIDE_DISTANCES: Final = (_WIDE, 0, 0, 0)
_DEAD_ROW: Final = ROW.pack(bytes(16), 0, 0, 0, 0, _DEAD, 0, 0, 0, 0, 0)

_Row = tuple[bytes, int, int, int, int, int, int, int, int, int, int]
"""The fields of one :data:`ROW`, unpacked."""
_HomesOf = Callable[[list[int]], list[int]]
"""The index homes of rows given by absolute number."""

_ULID_CHARS: Final = 26


def _digit_table() -> bytes:
    """A ``bytes.translate`` table: Crockford's upper-case digits to ``int(…, 32)``'s, any other byte to ``!``."""
    table = bytearray(b"!" * 256)
    for crockford, digit in zip(b"0123456789ABCDEFGHJKMNPQRSTVWXYZ", b"0123456789abcdefghijklmnopqrstuv", strict=True):
        table[crockford] = digit
    return bytes(table)


_CROCKFORD_DIGITS: Final = _digit_table()


class Settled(msgspec.Struct, frozen=True, gc=False):
    """A row of the table, as a value made on demand (equal rows give equal values)."""

    row: int  # absolute row number: a void moves the entry to a new one
    billing_entry_id: str
    state: EntryState
    charged_micro: int  # what a COMMITTED charge may still refund; 0 otherwise
    updated_at_ms: int
    seqs: tuple[int, ...]  # the sequences of the events that made it


class _Extras(msgspec.Struct, array_like=True):
    odd: dict[str, int] = {}  # non-ULID entry id → absolute row
    wide: dict[int, tuple[int, ...]] = {}  # absolute row → its sequences (too many or too far apart)


_BLAKE2B_8: Final = hashlib.blake2b(digest_size=8)  # copied per hash: cheaper than a new one with its keyword


def request_hash(account_id: str, request_id: str) -> int:
    """The 64-bit hash of a request key (stable across processes: stored in snapshots)."""
    hasher = _BLAKE2B_8.copy()
    hasher.update(f"{account_id} {request_id}".encode())
    return int.from_bytes(hasher.digest(), "little")


def account_hash(account_id: str) -> int:
    """The 32-bit hash of an account id, to narrow a scan of one account's entries."""
    return zlib.crc32(account_id.encode())


def _ulid_value(entry_id: str) -> int | None:
    """The 128-bit value of a canonical ULID, None for any other id.

    What :func:`tollway.core.ids.is_ulid` accepts, checked in C: every byte outside the Crockford alphabet becomes one
    ``int()`` refuses, and 26 base-32 digits are below 2¹²⁸ exactly when the first is 0-7.
    """
    if len(entry_id) != _ULID_CHARS or not entry_id.isascii():
        return None
    try:
        value = int(entry_id.encode().translate(_CROCKFORD_DIGITS), 32)
    except ValueError:
        return None
    return None if value >> 128 else value


def _id_home(value: int) -> int:
    """The index home of an id's 128 bits: its halves folded, then :func:`_mix`."""
    return _mix((value ^ (value >> 64)) & _MASK64)


def _mix(folded: int) -> int:
    """A 64-bit hash of an id's folded halves, every bit counting in the low ones (a multiply, its high half folded in).

    Ids made in one millisecond differ in few low bits, and test ids in even fewer: the index
    takes the low bits of this, so they must depend on all of the id.
    """
    product = (folded * _GOLDEN) & _MASK64
    return product ^ (product >> 32)


class SettledTable:
    """Settled entries' records: fixed-size rows in settle order, indexed by entry id and request-key hash."""

    __slots__ = (
        "_asked",
        "_base",
        "_eager",
        "_extras",
        "_head",
        "_id_counts",
        "_ids",
        "_live",
        "_odd_rows",
        "_req_counts",
        "_reqs",
        "_rows",
        "_tail",
        "_unindexed",
    )

    def __init__(self) -> None:
        self._rows = bytearray()  # rows base..tail-1
        self._base = 0  # absolute number of the first row in _rows
        self._head = 0  # absolute number of the first row that may be live
        self._tail = 0  # absolute number of the next row
        self._live = 0
        # Each index: SEGMENTS arrays, and how many rows each holds (derived: its slots less its empty ones).
        self._ids = [_empty_segment(1 << _BITS_MIN) for _ in range(SEGMENTS)]
        self._reqs = [_empty_segment(1 << _BITS_MIN) for _ in range(SEGMENTS)]
        self._id_counts = [0] * SEGMENTS
        self._req_counts = [0] * SEGMENTS
        self._extras = _Extras({}, {})
        self._odd_rows: dict[int, str] = {}  # derived from _extras.odd
        # The indexes lag behind the rows: the last ``_unindexed`` rows are not in them yet. Whatever
        # reads them brings them up to date first (``catch_up``). The next ``_eager`` rows appended after a
        # read (live work: commands read, their settlements append) go in at once, from the hashes at hand.
        self._unindexed = 0
        self._eager = 0
        # Request-key hashes looked up and not found (a reserve's new request), for its settlement to reuse.
        self._asked: dict[tuple[str, str], int] = {}

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._live

    def __contains__(self, entry_id: object) -> bool:
        return isinstance(entry_id, str) and self._find(entry_id) is not None

    def get(self, entry_id: str) -> Settled | None:
        """The record of ``entry_id``, None when it has none."""
        row = self._find(entry_id)
        return None if row is None else self._record(row)

    def by_request(self, account_id: str, request_id: str) -> list[Settled]:
        """Records whose request-key hash matches: candidates, to be confirmed against the log."""
        key = request_hash(account_id, request_id)
        self.catch_up()
        index = self._reqs[key & _SEG_MASK]
        mask = len(index) - 1
        slot, found = (key >> _SEG_BITS) & mask, []
        while (value := index[slot]) != _EMPTY:
            row = (value - self._base) & _MASK32
            if _REQ.unpack_from(self._rows, row * ROW_BYTES + _REQ_AT)[0] == key:
                found.append(self._record(row))
            slot = (slot + 1) & mask
        if not found:  # a new request: its settlement will want the hash again
            asked = self._asked
            if len(asked) >= _ASKED_MAX:  # requests refused or never settled: forget them all
                asked.clear()
            asked[account_id, request_id] = key
        return found

    def __iter__(self) -> Iterator[str]:
        """The entry ids of live records, oldest change first (like a dict's keys)."""
        return (record.billing_entry_id for record in self.records())

    def records(self) -> Iterator[Settled]:
        """Live records, oldest change first."""
        for row in range((self._head - self._base) & _MASK32, (self._tail - self._base) & _MASK32):
            if self._rows[row * ROW_BYTES + _STATE_AT] & 0x7F != _DEAD:
                yield self._record(row)

    def of_account(self, account_id: str) -> Iterator[tuple[str, EntryState]]:
        """(entry id, state) of records whose account hash matches ``account_id``'s: candidates to confirm."""
        wanted = account_hash(account_id)
        for row in range((self._head - self._base) & _MASK32, (self._tail - self._base) & _MASK32):
            fields = self._fields(row)
            if fields[2] == wanted and fields[5] & 0x7F != _DEAD:
                yield self._id_of(row, fields), _CODES[fields[5] & 0x7F]

    def state_counts(self) -> dict[EntryState, int]:
        """How many live records are in each state."""
        counts: dict[EntryState, int] = {}
        rows = self._rows
        for row in range((self._head - self._base) & _MASK32, (self._tail - self._base) & _MASK32):
            code = rows[row * ROW_BYTES + _STATE_AT] & 0x7F
            if code != _DEAD:
                counts[_CODES[code]] = counts.get(_CODES[code], 0) + 1
        return counts

    # -- changes ---------------------------------------------------------------------------

    def add(
        self,
        entry_id: str,
        account_id: str,
        request_id: str,
        *,
        state: EntryState,
        charged_micro: int,
        updated_at_ms: int,
        seqs: tuple[int, ...],
    ) -> None:
        """A record for ``entry_id``, at the end. The caller knows it has none (the fold settles an entry once)."""
        asked = self._asked  # empty in a replay: no tuple made there
        req_hash = asked.pop((account_id, request_id), None) if asked else None
        if req_hash is None:
            req_hash = request_hash(account_id, request_id)
        self._append(entry_id, req_hash, account_hash(account_id), _CODE[state], charged_micro, updated_at_ms, seqs)

    def replace(self, entry_id: str, state: EntryState, charged_micro: int, updated_at_ms: int, seq: int) -> None:
        """Move ``entry_id``'s record to the end with a new state, refund and time, and event ``seq`` added."""
        row = self._find(entry_id)
        if row is None:
            raise InvariantViolation(f"no settled record of {entry_id}")
        fields = self._fields(row)
        seqs = (*self._seqs(row, fields), seq)
        self._remove(row)
        self._append(entry_id, fields[1], fields[2], _CODE[state], charged_micro, updated_at_ms, seqs)

    def remove(self, entry_id: str) -> Settled:
        """Forget ``entry_id``'s record (archived past the retention); returns it."""
        row = self._find(entry_id)
        if row is None:
            raise InvariantViolation(f"no settled record of {entry_id}")
        record = self._record(row)
        self._remove(row)
        return record

    def matches(self, record: Settled, account_id: str, request_id: str | None = None) -> bool:
        """Whether ``record``'s hashes are those of ``account_id`` (and ``request_id``): a check, not a proof."""
        fields = self._fields((record.row - self._base) & _MASK32)
        if fields[2] != account_hash(account_id):
            return False
        return request_id is None or fields[1] == request_hash(account_id, request_id)

    # -- snapshots -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The table as bytes: its buffers as they are (live span of the rows, both indexes)."""
        self.catch_up()
        start = (self._head - self._base) * ROW_BYTES
        header = _HEADER.pack(_MAGIC, self._head, self._head, self._tail, self._live)
        bits = bytes(len(segment).bit_length() - 1 for segment in (*self._ids, *self._reqs))
        extras = msgspec.msgpack.encode(self._extras)
        return b"".join(
            [
                header,
                bits,
                memoryview(self._rows)[start:],
                *(segment.tobytes() for segment in self._ids),
                *(segment.tobytes() for segment in self._reqs),
                extras,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SettledTable:
        """The table :meth:`to_bytes` wrote; ``ValueError`` when the bytes do not hold one."""
        table = cls()
        if not data:
            return table
        view = memoryview(data)
        if bytes(view[:4]) == _MAGIC_V1:
            return cls._from_v1(view)
        if len(view) < _HEADER.size + 2 * SEGMENTS:
            raise ValueError("settled-entry table cut short")
        magic, base, head, tail, live = _HEADER.unpack_from(view)
        at = _HEADER.size + 2 * SEGMENTS
        bits = view[_HEADER.size : at]
        if magic != _MAGIC or not head <= tail or not max(bits) <= _BITS_MAX:
            raise ValueError("not a settled-entry table")
        rows_end = at + (tail - base) * ROW_BYTES
        if len(view) < rows_end + sum(4 << b for b in bits):
            raise ValueError("settled-entry table cut short")
        table._rows = bytearray(view[at:rows_end])
        at, segments = rows_end, []
        for b in bits:
            segment = array("I")
            segment.frombytes(view[at : at + (4 << b)])
            segments.append(segment)
            at += 4 << b
        table._ids, table._reqs = segments[:SEGMENTS], segments[SEGMENTS:]
        table._id_counts = [len(segment) - segment.count(_EMPTY) for segment in table._ids]
        table._req_counts = [len(segment) - segment.count(_EMPTY) for segment in table._reqs]
        table._base, table._head, table._tail, table._live = base, head, tail, live
        table._extras = msgspec.msgpack.decode(view[at:], type=_Extras)
        table._odd_rows = {row: entry_id for entry_id, row in table._extras.odd.items()}
        return table

    @classmethod
    def _from_v1(cls, view: memoryview) -> SettledTable:
        """A table of the first format (one array per index): its rows as they were, indexed anew when first read."""
        table = cls()
        magic, base, head, tail, live, id_bits, req_bits = _HEADER_V1.unpack_from(view)
        if magic != _MAGIC_V1 or not head <= tail or not 0 < min(id_bits, req_bits) <= max(id_bits, req_bits) < 40:
            raise ValueError("not a settled-entry table")
        at = _HEADER_V1.size
        rows_end = at + (tail - base) * ROW_BYTES
        req_end = rows_end + (4 << id_bits) + (4 << req_bits)
        if len(view) < req_end:
            raise ValueError("settled-entry table cut short")
        table._rows = bytearray(view[at:rows_end])
        table._base, table._head, table._tail, table._live = base, head, tail, live
        table._unindexed = tail - head  # removed rows among them are skipped
        table._extras = msgspec.msgpack.decode(view[req_end:], type=_Extras)
        table._odd_rows = {row: entry_id for entry_id, row in table._extras.odd.items()}
        return table

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SettledTable) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment] # mutable

    def copy(self) -> SettledTable:
        """A detached copy (buffers copied in C)."""
        return SettledTable.from_bytes(self.to_bytes())

    # -- inside ----------------------------------------------------------------------------

    def _record(self, row: int) -> Settled:
        fields = self._fields(row)
        return Settled(
            (self._base + row) & _MASK32,
            self._id_of(row, fields),
            _CODES[fields[5] & 0x7F],
            fields[4],
            fields[3],
            self._seqs(row, fields),
        )

    def _fields(self, row: int) -> _Row:
        fields: _Row = ROW.unpack_from(self._rows, row * ROW_BYTES)
        return fields

    def _id_of(self, row: int, fields: _Row) -> str:
        if fields[5] & _ODD:
            return self._odd_rows[(self._base + row) & _MASK32]
        return encode_ulid(int.from_bytes(fields[0], "big"))

    def _seqs(self, row: int, fields: _Row) -> tuple[int, ...]:
        first, distances = fields[6], fields[7:]
        if distances[0] == _WIDE:
            return self._extras.wide[(self._base + row) & _MASK32]
        return (first, *(first + d for d in distances if d))

    def _find(self, entry_id: str) -> int | None:
        """The row (relative to the buffer) of ``entry_id``'s record."""
        self.catch_up()  # a removal unlinks the row it finds from both indexes
        value = _ulid_value(entry_id)
        if value is None:
            absolute = self._extras.odd.get(entry_id)
            return None if absolute is None else (absolute - self._base) & _MASK32
        wanted, home, rows = value.to_bytes(16, "big"), _id_home(value), self._rows
        index = self._ids[home & _SEG_MASK]
        mask = len(index) - 1
        slot = (home >> _SEG_BITS) & mask
        while (stored := index[slot]) != _EMPTY:
            row = (stored - self._base) & _MASK32
            at = row * ROW_BYTES
            if rows[at : at + 16] == wanted and not rows[at + _STATE_AT] & _ODD:
                return row
            slot = (slot + 1) & mask
        return None

    def _append(  # noqa: PLR0917 - positional on purpose: once per settled entry, keywords cost more
        self,
        entry_id: str,
        req_hash: int,
        acct_hash: int,
        code: int,
        charged_micro: int,
        updated_at_ms: int,
        seqs: tuple[int, ...],
    ) -> None:
        """A row at the end for ``entry_id``, indexed now or when next read; ``code`` is its state's."""
        if self._tail & _MASK32 == _EMPTY:  # that number marks an empty index slot: a removed row takes it
            self._rows += _DEAD_ROW
            self._tail += 1
            self._unindexed += 1
        absolute = self._tail & _MASK32
        value = _ulid_value(entry_id)
        if value is None:
            self._extras.odd[entry_id] = absolute
            self._odd_rows[absolute] = entry_id
            code |= _ODD
        count = len(seqs)
        first = seqs[0] if count else 0
        if count > _SEQS_MAX or (count > 1 and seqs[-1] - first >= _WIDE):  # ascending: the last is the widest
            self._extras.wide[absolute] = seqs
            distances: tuple[int, ...] = _WIDE_DISTANCES
        elif count == 2:  # a reserve and its commit or release: the usual entry
            distances = (seqs[1] - first, 0, 0, 0)
        else:
            distances = (*[seq - first for seq in seqs[1:]], 0, 0, 0, 0)[:4]
        self._rows += ROW.pack(
            b"" if value is None else value.to_bytes(16, "big"),
            req_hash,
            acct_hash,
            updated_at_ms,
            charged_micro,
            code,
            first,
            *distances,
        )
        self._tail += 1
        self._live += 1
        if self._unindexed or not self._eager:  # appends long after a read (a replay): indexed at the next read
            self._unindexed += 1
        else:  # as catch_up would put it
            if value is not None:
                self._insert(self._ids, self._id_counts, _id_home(value), absolute, self._id_homes)
            self._insert(self._reqs, self._req_counts, req_hash, absolute, self._req_homes)
            self._eager -= 1

    def _remove(self, row: int) -> None:
        at = row * ROW_BYTES
        fields = self._fields(row)
        absolute = (self._base + row) & _MASK32
        if fields[5] & _ODD:
            del self._extras.odd[self._odd_rows.pop(absolute)]
        else:
            home = _mix(operator.xor(*_HALVES.unpack(fields[0])))
            self._id_counts[home & _SEG_MASK] -= 1
            self._unlink(self._ids[home & _SEG_MASK], home, absolute, self._id_home_of)
        self._req_counts[fields[1] & _SEG_MASK] -= 1
        self._unlink(self._reqs[fields[1] & _SEG_MASK], fields[1], absolute, self._req_home_of)
        self._extras.wide.pop(absolute, None)
        self._rows[at + _STATE_AT] = _DEAD
        self._live -= 1
        self._cut_front()

    def _id_home_of(self, absolute: int) -> int:
        at = ((absolute - self._base) & _MASK32) * ROW_BYTES
        return _mix(operator.xor(*_HALVES.unpack_from(self._rows, at)))

    def _req_home_of(self, absolute: int) -> int:
        return int(_REQ.unpack_from(self._rows, ((absolute - self._base) & _MASK32) * ROW_BYTES + _REQ_AT)[0])

    def _id_homes(self, absolutes: list[int]) -> list[int]:
        """:meth:`_id_home_of` of many rows (a segment growing), in one comprehension."""
        rows, base, unpack = self._rows, self._base, _HALVES.unpack_from
        return [_mix(operator.xor(*unpack(rows, ((absolute - base) & _MASK32) * ROW_BYTES))) for absolute in absolutes]

    def _req_homes(self, absolutes: list[int]) -> list[int]:
        """:meth:`_req_home_of` of many rows (a segment growing), in one comprehension."""
        rows, base, unpack = self._rows, self._base, _REQ.unpack_from
        return [unpack(rows, ((absolute - base) & _MASK32) * ROW_BYTES + _REQ_AT)[0] for absolute in absolutes]

    @staticmethod
    def _unlink(index: array[int], home: int, absolute: int, home_of: object) -> None:
        """Remove ``absolute`` from a linear-probing segment, shifting later items of its run back (no tombstones)."""
        assert callable(home_of)
        mask = len(index) - 1
        hole = (home >> _SEG_BITS) & mask
        while index[hole] != absolute:
            ensure(index[hole] != _EMPTY, "settled row %d missing from its index", absolute)
            hole = (hole + 1) & mask
        slot = hole
        while True:
            slot = (slot + 1) & mask
            stored = index[slot]
            if stored == _EMPTY:
                break
            want = (home_of(stored) >> _SEG_BITS) & mask
            # ``stored`` may move back to ``hole`` unless its home lies cyclically in (hole, slot].
            if (hole < slot and hole < want <= slot) or (hole > slot and (want > hole or want <= slot)):
                continue
            index[hole] = stored
            hole = slot
        index[hole] = _EMPTY

    def _cut_front(self) -> None:
        """Skip removed rows at the front; cut them off once they are as many as the live rows."""
        rows, head = self._rows, (self._head - self._base) & _MASK32
        end = (self._tail - self._base) & _MASK32
        while head < end and rows[head * ROW_BYTES + _STATE_AT] & 0x7F == _DEAD:
            head += 1
        self._head = self._base + head
        if head >= max(_CUT_MIN_ROWS, self._live) or head == end:
            del rows[: head * ROW_BYTES]
            self._base = self._head

    def catch_up(self) -> None:
        """Put the rows appended since the indexes were last read into them, doubling segments that must grow.

        They end exactly as inserting each row when it was appended would have left them (a
        segment that doubles takes its rows again in row order), so the bytes do not depend on when
        anyone read them: rows are appended in row order, and none is removed while some are
        unindexed (a removal finds its row through the index first). A replay appends hundreds of
        thousands of rows and reads the indexes once: each segment then doubles once, not at every size.
        """
        self._eager = _EAGER_AFTER_READ
        count = self._unindexed
        if not count:
            return
        self._unindexed = 0
        first = (self._tail - count - self._base) & _MASK32
        if count < _SMALL_CATCH_UP:  # the live path: the few rows settled since the last command
            for row in range(first, first + count):
                fields = ROW.unpack_from(self._rows, row * ROW_BYTES)
                if fields[5] & 0x7F == _DEAD:
                    continue
                absolute = (self._base + row) & _MASK32
                if not fields[5] & _ODD:
                    home = _mix(operator.xor(*_HALVES.unpack(fields[0])))
                    self._insert(self._ids, self._id_counts, home, absolute, self._id_homes)
                self._insert(self._reqs, self._req_counts, fields[1], absolute, self._req_homes)
            return
        # First every row's homes (and how many rows each segment gets), then each segment grown once, then the inserts.
        id_homes, id_rows, req_homes, req_rows = array("Q"), array("I"), array("Q"), array("I")
        id_counts, req_counts, base = self._id_counts, self._req_counts, self._base
        id_home, id_row, req_home, req_row = id_homes.append, id_rows.append, req_homes.append, req_rows.append
        with memoryview(self._rows) as rows:
            view = rows[first * ROW_BYTES :]
            columns = zip(_KEY_COLUMNS.iter_unpack(view), _ID_COLUMN.iter_unpack(view), strict=True)
            for offset, ((request, code), (high, low)) in enumerate(columns, first):
                if code & 0x7F == _DEAD:
                    continue
                absolute = (base + offset) & _MASK32
                if not code & _ODD:
                    product = ((high ^ low) * _GOLDEN) & _MASK64  # _mix, inlined: hundreds of thousands of rows
                    home = product ^ (product >> 32)
                    id_counts[home & _SEG_MASK] += 1
                    id_home(home)
                    id_row(absolute)
                req_counts[request & _SEG_MASK] += 1
                req_home(request)
                req_row(absolute)
        self._insert_all(self._ids, id_counts, id_homes, id_rows, self._id_homes)
        self._insert_all(self._reqs, req_counts, req_homes, req_rows, self._req_homes)

    def _insert(
        self, segments: list[array[int]], counts: list[int], home: int, absolute: int, homes_of: _HomesOf
    ) -> None:
        """Put one row in its segment, doubled first if it would be over two thirds full."""
        number = home & _SEG_MASK
        counts[number] += 1
        segment = segments[number]
        if 3 * counts[number] > 2 * len(segment):
            segment = segments[number] = self._regrown(segment, 2 * len(segment), homes_of)
        mask = len(segment) - 1
        slot = (home >> _SEG_BITS) & mask
        while segment[slot] != _EMPTY:
            slot = (slot + 1) & mask
        segment[slot] = absolute

    def _insert_all(
        self,
        segments: list[array[int]],
        counts: list[int],
        homes: array[int],
        rows: array[int],
        homes_of: _HomesOf,
    ) -> None:
        """Put many rows (in row order, counted in ``counts`` already) in their segments, each grown once as needed."""
        for number, count in enumerate(counts):
            size = len(segments[number])
            if 3 * count > 2 * size:
                while 3 * count > 2 * size:
                    size *= 2
                segments[number] = self._regrown(segments[number], size, homes_of)
        masks = [len(segment) - 1 for segment in segments]
        for home, absolute in zip(homes, rows, strict=True):  # inserts inlined: a replay's rows, all at once
            number = home & _SEG_MASK
            segment, mask = segments[number], masks[number]
            slot = (home >> _SEG_BITS) & mask
            while segment[slot] != _EMPTY:
                slot = (slot + 1) & mask
            segment[slot] = absolute

    def _regrown(self, segment: array[int], size: int, homes_of: _HomesOf) -> array[int]:
        """``segment``'s rows in a new array of ``size`` slots, put in again in row order (bytes free of history)."""
        ensure(size.bit_length() - 1 <= _BITS_MAX, "a settled-entry index segment past %d slots", size)
        mask, grown, values = size - 1, _empty_segment(size), sorted(segment)  # in C: empty slots sort last
        del values[bisect.bisect_left(values, _EMPTY) :]
        wrap = bisect.bisect_left(values, self._base & _MASK32)  # row order: numbers wrapped past 2³² come last
        ordered = values[wrap:] + values[:wrap]
        for absolute, home in zip(ordered, homes_of(ordered), strict=True):
            slot = (home >> _SEG_BITS) & mask
            while grown[slot] != _EMPTY:
                slot = (slot + 1) & mask
            grown[slot] = absolute
        return grown


def _empty_segment(size: int) -> array[int]:
    """An index segment of ``size`` empty slots."""
    return array("I", [_EMPTY]) * size
