"""WAL record framing and checksums. Pure: bytes in, bytes or events out, no files.

A record is::

    offset 0   u32 little-endian   CRC-32 (zlib) of every byte from offset 4 to the end
    offset 4   u32 little-endian   body length N (1 ≤ N ≤ MAX_RECORD_BYTES)
    offset 8   N bytes             body: one JSON object, the envelope with its payload

so the checksum covers every byte of the record except itself: the length, the envelope and
the payload, in one contiguous run. The body is ``{"schema_version", "event_type", "wal_sequence", "timestamp_ms",
"billing_entry_id", "correlation_id", "payload"}``; amounts named in a payload's
``MONEY_FIELDS`` are canonical decimal strings. See ``docs/wal-format.md``.

:func:`decode_run` walks a buffer record by record and says precisely where and why it stopped,
so the log layer can tell a torn tail (cut it off) from corruption (refuse to start); :func:`scan`
is the same walk one record at a time.
"""

from __future__ import annotations

import enum
import struct
import typing
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from tollway.core import events as ev
from tollway.core.errors import InvalidInput, RecordTooLarge, WalUnsupported

HEADER: Final = struct.Struct("<II")
HEADER_BYTES: Final = HEADER.size
MAX_RECORD_BYTES: Final = 1 << 20
"""Largest body accepted; a stored response is at most 64 KiB, so this is generous."""
MAX_RUN_RECORDS: Final = 256
"""Records :func:`decode_run` decodes in one call unless told otherwise: a replay holds this many events at once."""

SEGMENT_MAGIC: Final = b"TOLLWAY-WAL\x00\x00\x00\x00\x01"
"""First 16 bytes of every segment file: a name and the format version (1)."""


class _Envelope(msgspec.Struct, frozen=True):
    schema_version: int
    event_type: str
    wal_sequence: int
    timestamp_ms: int
    billing_entry_id: str
    correlation_id: str
    payload: msgspec.Raw


def _record_type(cls: type[ev.Payload]) -> type[msgspec.Struct]:
    """A struct for the whole body of one event type, so one native call decodes a record."""
    return msgspec.defstruct(
        f"Record_{cls.EVENT_TYPE}",
        [
            ("schema_version", int),
            ("wal_sequence", int),
            ("timestamp_ms", int),
            ("billing_entry_id", str),
            ("correlation_id", str),
            ("payload", cls),
        ],
        tag_field="event_type",
        tag=cls.EVENT_TYPE,
        frozen=True,
    )


_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)
# strict=False turns the canonical decimal strings of money fields back into ints.
_PAYLOAD_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    name: msgspec.json.Decoder(cls, strict=False) for name, cls in ev.PAYLOAD_BY_TYPE.items()
}
_RECORD_DECODER: Final[msgspec.json.Decoder[Any]] = msgspec.json.Decoder(
    typing.Union[tuple(_record_type(cls) for cls in ev.PAYLOAD_TYPES)],  # noqa: UP007
    strict=False,
)
_ENCODER: Final = msgspec.json.Encoder()


def _wire_maker(cls: type[ev.Payload]) -> Callable[[ev.Payload], dict[str, Any]]:
    """A function building ``cls``'s wire dict as one literal (money fields as decimal strings).

    Generated once per payload type at import: a dict literal is several times faster than a
    comprehension over fields, and this runs for every event written. Only field names from
    the class definition go into the generated source.
    """
    items = []
    for name in cls.__struct_fields__:
        if not name.isidentifier():
            raise TypeError(f"{cls.__name__}.{name} is not an identifier")
        if name in cls.MONEY_FIELDS:
            items.append(f"{name!r}: (None if p.{name} is None else str(p.{name}))")
        else:
            items.append(f"{name!r}: p.{name}")
    namespace: dict[str, Any] = {}
    exec(f"def to_wire(p):\n    return {{{', '.join(items)}}}", namespace)  # noqa: S102 - see docstring
    to_wire: Callable[[ev.Payload], dict[str, Any]] = namespace["to_wire"]
    return to_wire


_TO_WIRE: Final = {cls: _wire_maker(cls) for cls in ev.PAYLOAD_TYPES}


def encode_body(event: ev.Event) -> bytes:
    """The JSON body of ``event``."""
    payload = event.payload
    return _ENCODER.encode(
        {
            "schema_version": ev.BILLING_WAL_SCHEMA_VERSION,
            "event_type": payload.EVENT_TYPE,
            "wal_sequence": event.wal_sequence,
            "timestamp_ms": event.timestamp_ms,
            "billing_entry_id": event.billing_entry_id,
            "correlation_id": event.correlation_id,
            "payload": _TO_WIRE[type(payload)](payload),
        }
    )


def frame(body: bytes) -> bytes:
    """Frame a body: CRC-32 over length and body, length, body.

    Refuses (:class:`RecordTooLarge`) a body the reader would refuse: one limit,
    :data:`MAX_RECORD_BYTES`, for both, so no acknowledged record is ever cut off as a torn tail.
    """
    if len(body) > MAX_RECORD_BYTES:
        raise RecordTooLarge(f"the record would be {len(body)} bytes; the log accepts at most {MAX_RECORD_BYTES}")
    length = len(body).to_bytes(4, "little")
    return zlib.crc32(body, zlib.crc32(length)).to_bytes(4, "little") + length + body


def encode(event: ev.Event) -> bytes:
    """The complete framed record of ``event``; :class:`InvalidInput` if it cannot be recorded as it is."""
    try:
        body = encode_body(event)
    except (msgspec.EncodeError, UnicodeEncodeError, OverflowError, TypeError) as exc:
        raise InvalidInput(f"{event.event_type} cannot be recorded: {exc}") from exc
    return frame(body)


def decode_body(body: bytes | memoryview) -> ev.Event:
    """Decode a checksum-verified body. Unknown event types decode to :class:`ev.Unknown`."""
    try:
        rec = _RECORD_DECODER.decode(body)
    except msgspec.ValidationError:
        return _decode_slowly(body)  # an unknown type or a newer schema: find out which
    if rec.schema_version > ev.BILLING_WAL_SCHEMA_VERSION:
        return _decode_slowly(body)
    return ev.Event(rec.wal_sequence, rec.timestamp_ms, rec.billing_entry_id, rec.correlation_id, rec.payload)


def _decode_slowly(body: bytes | memoryview) -> ev.Event:
    env = _ENVELOPE_DECODER.decode(body)
    if env.schema_version > ev.BILLING_WAL_SCHEMA_VERSION:
        raise WalUnsupported(
            f"record {env.wal_sequence} has schema_version {env.schema_version}; "
            f"this reader knows up to {ev.BILLING_WAL_SCHEMA_VERSION}"
        )
    decoder = _PAYLOAD_DECODERS.get(env.event_type)
    payload = ev.Unknown(env.event_type) if decoder is None else decoder.decode(env.payload)
    return ev.Event(env.wal_sequence, env.timestamp_ms, env.billing_entry_id, env.correlation_id, payload)


def payload_json(body: bytes | memoryview) -> dict[str, Any]:
    """The body as plain JSON data, for inspection tools."""
    result: dict[str, Any] = msgspec.json.decode(body)
    return result


class Stop(enum.Enum):
    """Why :func:`scan` stopped before the end of the buffer."""

    SHORT_HEADER = "incomplete record header"
    SHORT_BODY = "record body runs past the end of the segment"
    BAD_LENGTH = "record length out of range"
    BAD_CHECKSUM = "checksum mismatch"
    BAD_BODY = "record body does not decode"
    BAD_SEQUENCE = "sequence is not the previous one plus one"
    UNSUPPORTED = "record from a newer schema version"


@dataclass(frozen=True, slots=True)
class ScanEnd:
    """Where a scan ended: ``stop`` is None when it consumed the whole buffer."""

    offset: int
    stop: Stop | None
    detail: str = ""


def decode_run(
    buf: bytes | memoryview,
    start: int,
    expected_seq: int | None,
    events: list[ev.Event],
    *,
    limit: int = MAX_RUN_RECORDS,
    offsets: list[int] | None = None,
) -> ScanEnd:
    """Append to ``events`` each valid record from ``start``, at most ``limit`` of them; say where it stopped.

    The one loop that checks records, so every reader refuses exactly the same ones. It returns
    a :class:`ScanEnd`: where the last valid record appended ends and, when it stopped on a bad
    record, why (``stop``); ``stop`` is None when it reached the end of ``buf`` or ``limit``.
    ``expected_seq`` (when given) is the sequence the first record must carry; each next one
    must be one more. With ``offsets`` each record's offset is appended to it as well.

    A list, not a generator: a whole-log replay calls this once per :data:`MAX_RUN_RECORDS`
    records, and a record costs no generator step, no tuple and no call of :func:`decode_body`
    (inlined). Runs much longer than that cost more, not less: their events outgrow the
    allocator's free blocks (callgrind: 4,096 at a time cost 10 % more than 256).
    """
    view = memoryview(buf)
    size = len(view)
    offset = start
    crc32, unpack, decode, append = zlib.crc32, HEADER.unpack_from, _RECORD_DECODER.decode, events.append
    event_type, schema_version = ev.Event, ev.BILLING_WAL_SCHEMA_VERSION
    goal = len(events) + limit
    note = ([] if offsets is None else offsets).append  # no test per record
    while offset < size and len(events) < goal:
        if size - offset < HEADER_BYTES:
            return ScanEnd(offset, Stop.SHORT_HEADER)
        crc, length = unpack(view, offset)
        body_start = offset + HEADER_BYTES
        end = body_start + length
        if not 0 < length <= MAX_RECORD_BYTES or end > size:
            return _bad_frame(offset, length, size)
        if crc32(view[offset + 4 : end]) != crc:
            return ScanEnd(offset, Stop.BAD_CHECKSUM)
        body = view[body_start:end]
        try:  # decode_body, inlined
            rec = decode(body)
        except msgspec.ValidationError:
            rec = None
        except msgspec.DecodeError as exc:
            return ScanEnd(offset, Stop.BAD_BODY, str(exc))
        if rec is not None and rec.schema_version <= schema_version:
            event = event_type(
                rec.wal_sequence, rec.timestamp_ms, rec.billing_entry_id, rec.correlation_id, rec.payload
            )
        else:  # an unknown type or a newer schema: find out which
            slow = _decode_or_stop(body, offset)
            if isinstance(slow, ScanEnd):
                return slow
            event = slow
        if expected_seq is not None and event.wal_sequence != expected_seq:
            return ScanEnd(offset, Stop.BAD_SEQUENCE, f"expected {expected_seq}, found {event.wal_sequence}")
        append(event)
        note(offset)
        expected_seq = event.wal_sequence + 1
        offset = end
    return ScanEnd(offset, None)


def _bad_frame(offset: int, length: int, size: int) -> ScanEnd:
    """Why the record at ``offset`` of a buffer of ``size`` bytes, whose header says ``length``, is not whole."""
    if length == 0 or length > MAX_RECORD_BYTES:
        return ScanEnd(offset, Stop.BAD_LENGTH, f"length {length}")
    return ScanEnd(offset, Stop.SHORT_BODY, f"needs {length} bytes, {size - offset - HEADER_BYTES} left")


def _decode_or_stop(body: memoryview, offset: int) -> ev.Event | ScanEnd:
    """:func:`decode_body`'s slow path for the record at ``offset``, or why the scan stops there."""
    try:
        return _decode_slowly(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return ScanEnd(offset, Stop.BAD_BODY, str(exc))
    except WalUnsupported as exc:
        return ScanEnd(offset, Stop.UNSUPPORTED, exc.reason)


def scan(
    buf: bytes | memoryview, start: int, expected_seq: int | None, end_box: list[ScanEnd]
) -> Iterator[tuple[int, ev.Event]]:
    """Yield ``(offset, event)`` for each valid record from ``start``, one at a time (:func:`decode_run`'s checks).

    When it stops it appends one :class:`ScanEnd` to ``end_box``, saying where the last valid
    record ended and, if it stopped early, why. ``expected_seq`` (when given) is the sequence
    the first record must carry; each next one must be one more. Lazy: a reader that stops
    early decodes only what it took.
    """
    view = memoryview(buf)
    offset = start
    while True:
        found: list[ev.Event] = []
        end = decode_run(view, offset, expected_seq, found, limit=1)
        if not found:
            end_box.append(end)
            return
        yield offset, found[0]
        expected_seq = found[0].wal_sequence + 1
        offset = end.offset
