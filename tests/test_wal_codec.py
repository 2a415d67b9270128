"""WAL record framing: round-trips, a checksum over every byte, money as strings, forward compatibility."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import events
from tollway import Credit, CreditKind, CreditResult, Engine, Settings
from tollway.core import events as ev
from tollway.core.errors import WalUnsupported
from tollway.core.ledger import Ledger, check_invariants
from tollway.wal import codec, segments

CANONICAL_MICRO = re.compile(r"0|[1-9][0-9]*")
RATE = ev.RateSnapshot(100, 1_000_000, 1_767_225_600_000)
ENTRY_ID = "01KDXZ8Q6S1C8V6Q4M9W0Y3B7T"
SAMPLE_EVENTS = [
    ev.Event(1, 1_767_225_600_000, ENTRY_ID, "untraced", ev.CreditMint("acct-1", "mint-1", 1_500_000)),
    ev.Event(
        2,
        1_767_225_600_001,
        ENTRY_ID,
        "trace-7",
        ev.BillingReserve("acct-1", "req-1", 20_000, 1_767_225_900_000, RATE, "reserve:20000:"),
    ),
    ev.Event(
        3,
        1_767_225_600_002,
        ENTRY_ID,
        "trace-7",
        ev.BillingCommit("acct-1", 20_000, 25_000, 24_000, 1_000, "debit_available", True, RATE),
    ),
]


def _scan_all(buf: bytes, expected_seq: int | None = None) -> tuple[list[tuple[int, ev.Event]], codec.ScanEnd]:
    box: list[codec.ScanEnd] = []
    found = list(codec.scan(buf, 0, expected_seq, box))
    assert 1 == len(box)
    return found, box[0]


def _body(event_type: str, seq: int, payload: dict[str, Any], schema_version: int = 1) -> bytes:
    """A record body written by hand, as a newer (or other) writer could have written it."""
    return msgspec.json.encode(
        {
            "schema_version": schema_version,
            "event_type": event_type,
            "wal_sequence": seq,
            "timestamp_ms": 1_767_225_600_000 + seq,
            "billing_entry_id": ENTRY_ID,
            "correlation_id": "untraced",
            "payload": payload,
        }
    )


def _reserve_wire() -> dict[str, Any]:
    return {
        "account_id": "acct-1",
        "request_id": "req-1",
        "estimated_cost_micro": "20000",
        "expires_at_ms": 1_767_225_900_000,
        "rate": {"credit_units_per_usd": 100, "usd_usdc_rate_ppm": 1_000_000, "frozen_at_ms": 0},
        "fingerprint": "reserve:20000:",
    }


# -- round trips ---------------------------------------------------------------------------


@given(events)
def test_record_round_trips(event: ev.Event) -> None:
    """Any event of any payload type decodes back to itself from its framed record."""
    record = codec.encode(event)
    found, end = _scan_all(record)
    assert [(0, event)] == found
    assert codec.ScanEnd(len(record), None) == end
    assert event == codec.decode_body(record[codec.HEADER_BYTES :])


@given(st.tuples(events.filter(lambda e: e.wal_sequence < 2**63 - 1), events))
def test_records_concatenate(pair: tuple[ev.Event, ev.Event]) -> None:
    """Records written back to back are read back in order, each at its own offset."""
    first, second = pair[0], msgspec.structs.replace(pair[1], wal_sequence=pair[0].wal_sequence + 1)
    buf = codec.encode(first) + codec.encode(second)
    found, end = _scan_all(buf)
    assert [(0, first), (len(codec.encode(first)), second)] == found
    assert len(buf) == end.offset
    assert end.stop is None


def test_record_layout_is_crc_length_body() -> None:
    """A record is CRC-32 of everything after it, then the body length, then the JSON body."""
    event = SAMPLE_EVENTS[1]
    record = codec.encode(event)
    body = codec.encode_body(event)
    assert len(body) == int.from_bytes(record[4:8], "little")
    assert body == record[8:]
    assert zlib.crc32(record[4:]) == int.from_bytes(record[:4], "little")


# -- the checksum covers every byte --------------------------------------------------------


@pytest.mark.parametrize("event", SAMPLE_EVENTS, ids=lambda e: e.event_type)
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_any_flipped_byte_stops_the_scan(event: ev.Event, mask: int) -> None:
    """Flipping any single byte of a record (CRC, length or body) makes the scan refuse it."""
    record = codec.encode(event)
    for index in range(len(record)):
        damaged = bytearray(record)
        damaged[index] ^= mask
        found, end = _scan_all(bytes(damaged))
        assert ([], 0) == (found, end.offset), f"byte {index}"
        if 4 <= index < 8:  # the length: a longer one runs past the end, a shorter one fails the CRC
            assert end.stop in {codec.Stop.BAD_CHECKSUM, codec.Stop.BAD_LENGTH, codec.Stop.SHORT_BODY}
        else:
            assert codec.Stop.BAD_CHECKSUM == end.stop, f"byte {index}"


def test_length_is_covered_by_the_checksum() -> None:
    """A record whose length was changed, with the framing still in bounds, fails its checksum."""
    record = codec.encode(SAMPLE_EVENTS[0])
    padded = bytearray(record + b" ")  # one more byte, so a length one larger still fits
    padded[4:8] = (len(record) - codec.HEADER_BYTES + 1).to_bytes(4, "little")
    _, end = _scan_all(bytes(padded))
    assert codec.Stop.BAD_CHECKSUM == end.stop


def test_a_valid_record_after_a_bad_one_is_not_reached() -> None:
    """The scan stops at the first bad record and reports the offset where the valid ones end."""
    first, second, third = (codec.encode(event) for event in SAMPLE_EVENTS)
    damaged = bytearray(second)
    damaged[len(second) // 2] ^= 0x01
    found, end = _scan_all(first + bytes(damaged) + third)
    assert [1] == [event.wal_sequence for _, event in found]
    assert codec.ScanEnd(len(first), codec.Stop.BAD_CHECKSUM) == end


@pytest.mark.parametrize("damaged", [False, True], ids=["clean", "damaged-last"])
@pytest.mark.parametrize("limit", [1, 2, 256])
def test_decoding_a_run_in_pieces_reads_what_the_scan_reads(limit: int, damaged: bool) -> None:
    """decode_run called again and again, a few records each time, finds the scan's events, offsets and end."""
    records = [codec.encode(event) for event in SAMPLE_EVENTS]
    last = bytearray(records[-1])
    last[-1] ^= 0x01 if damaged else 0x00
    buf = b"".join(records[:-1]) + bytes(last)
    expected, expected_end = _scan_all(buf, expected_seq=1)
    events: list[ev.Event] = []
    offsets: list[int] = []
    offset, seq = 0, 1
    while True:
        end = codec.decode_run(buf, offset, seq, events, limit=limit, offsets=offsets)
        if end.stop is not None or end.offset >= len(buf):
            break
        offset, seq = end.offset, events[-1].wal_sequence + 1
    assert expected == list(zip(offsets, events, strict=True))
    assert expected_end == end


@pytest.mark.parametrize(
    ("tail", "stop"),
    [
        (b"\x00" * 5, codec.Stop.SHORT_HEADER),
        (b"\x00" * 64, codec.Stop.BAD_LENGTH),
        ((1 << 21).to_bytes(4, "little") * 2, codec.Stop.BAD_LENGTH),
    ],
    ids=["short-header", "zero-length", "huge-length"],
)
def test_framing_errors_are_named(tail: bytes, stop: codec.Stop) -> None:
    """A cut header, a zero length and a length above the maximum each get their own reason."""
    record = codec.encode(SAMPLE_EVENTS[0])
    found, end = _scan_all(record + tail)
    assert 1 == len(found)
    assert (len(record), stop) == (end.offset, end.stop)


def test_sequence_must_follow_on() -> None:
    """With an expected sequence, a record that skips one stops the scan with BAD_SEQUENCE."""
    buf = codec.encode(SAMPLE_EVENTS[0]) + codec.encode(SAMPLE_EVENTS[2])
    found, end = _scan_all(buf, expected_seq=1)
    assert [1] == [event.wal_sequence for _, event in found]
    assert codec.Stop.BAD_SEQUENCE == end.stop
    assert "expected 2, found 3" == end.detail


# -- the JSON body -------------------------------------------------------------------------


@given(events)
def test_money_fields_are_canonical_decimal_strings(event: ev.Event) -> None:
    """Every MONEY_FIELDS amount is a canonical decimal string in the body; other ints stay numbers."""
    body = json.loads(codec.encode_body(event))
    payload = event.payload
    wire = body["payload"]
    for name in payload.__struct_fields__:
        value = getattr(payload, name)
        if name in payload.MONEY_FIELDS:
            if value is None:
                assert wire[name] is None
            else:
                assert isinstance(wire[name], str)
                assert CANONICAL_MICRO.fullmatch(wire[name]) is not None
                assert value == int(wire[name])
        elif isinstance(value, int):
            assert value == wire[name]


def test_body_envelope_fields() -> None:
    """The body carries the envelope of SPEC §4 around the payload, money written as strings."""
    body = json.loads(codec.encode_body(SAMPLE_EVENTS[2]))
    assert {
        "schema_version": 1,
        "event_type": "billing_commit",
        "wal_sequence": 3,
        "timestamp_ms": 1_767_225_600_002,
        "billing_entry_id": ENTRY_ID,
        "correlation_id": "trace-7",
        "payload": {
            "account_id": "acct-1",
            "estimated_cost_micro": "20000",
            "actual_cost_micro": "25000",
            "charged_micro": "24000",
            "uncollected_micro": "1000",
            "overrun_policy": "debit_available",
            "finalize": True,
            "rate": {"credit_units_per_usd": 100, "usd_usdc_rate_ppm": 1_000_000, "frozen_at_ms": 1_767_225_600_000},
        },
    } == body


def test_large_amount_is_exact() -> None:
    """An amount beyond a double's precision survives the round trip digit for digit."""
    amount = 2**63 - 1
    event = ev.Event(1, 0, ENTRY_ID, "untraced", ev.CreditMint("a", "m", amount, paid_micro_usdc=amount - 1))
    body = codec.encode_body(event)
    assert b'"amount_micro":"9223372036854775807"' in body
    assert b'"paid_micro_usdc":"9223372036854775806"' in body
    assert event == codec.decode_body(body)


# -- forward compatibility -----------------------------------------------------------------


def test_unknown_event_type_decodes_to_unknown() -> None:
    """A record of a type this reader does not know decodes to Unknown and keeps its envelope."""
    body = _body("billing_teleport", 7, {"account_id": "acct-1", "amount_micro": "5", "nested": [1, {"x": None}]})
    assert ev.Event(7, 1_767_225_600_007, ENTRY_ID, "untraced", ev.Unknown("billing_teleport")) == codec.decode_body(
        body
    )


def test_unknown_event_keeps_its_place_in_the_sequence() -> None:
    """An unknown record between known ones is yielded with its sequence, so continuity holds."""
    buf = (
        codec.encode(SAMPLE_EVENTS[0])
        + codec.frame(_body("future_event", 2, {"anything": "goes"}))
        + codec.encode(SAMPLE_EVENTS[2])
    )
    found, end = _scan_all(buf, expected_seq=1)
    assert [1, 2, 3] == [event.wal_sequence for _, event in found]
    assert ev.Unknown("future_event") == found[1][1].payload
    assert end.stop is None


@pytest.mark.parametrize(
    ("event_type", "payload"),
    [("billing_reserve", _reserve_wire()), ("billing_teleport", {"x": 1})],
    ids=["known-type", "unknown-type"],
)
def test_newer_schema_version_is_refused(event_type: str, payload: dict[str, Any]) -> None:
    """A record with schema_version 2 is refused, whatever its type, instead of being skipped."""
    body = _body(event_type, 1, payload, schema_version=2)
    with pytest.raises(WalUnsupported, match="schema_version 2"):
        codec.decode_body(body)
    found, end = _scan_all(codec.frame(body))
    assert ([], codec.Stop.UNSUPPORTED, 0) == (found, end.stop, end.offset)


def test_current_schema_hand_written_record_decodes() -> None:
    """A hand-written schema 1 reserve decodes to the payload type with integer money."""
    event = codec.decode_body(_body("billing_reserve", 1, _reserve_wire()))
    assert ev.BillingReserve(
        "acct-1", "req-1", 20_000, 1_767_225_900_000, ev.RateSnapshot(100, 1_000_000, 0), "reserve:20000:"
    ) == (event.payload)


def _write_log(settings: Settings, bodies: list[bytes]) -> None:
    settings.wal_dir.mkdir(parents=True)
    data = codec.SEGMENT_MAGIC + b"".join(codec.frame(body) for body in bodies)
    (settings.wal_dir / segments.segment_name(1)).write_bytes(data)


async def test_engine_replays_past_unknown_events(tmp_path: Path) -> None:
    """The engine opens a log holding an unknown event, counts its sequence and appends after it."""
    settings = Settings(data_dir=tmp_path / "data")
    mint = codec.encode_body(SAMPLE_EVENTS[0])
    _write_log(settings, [mint, _body("future_event", 2, {"amount_micro": "99"})])
    async with Engine.open(settings=settings) as engine:
        assert 2 == engine.state.last_sequence
        assert 1_500_000 == engine.balance("acct-1").available_micro
        result = await engine.execute(Credit("acct-1", "mint-2", CreditKind.MINT, 1))
        assert isinstance(result, CreditResult)
        assert 3 == result.wal_sequence
        logged = list(segments.iter_events(settings.wal_dir))
        assert [] == check_invariants(engine.state, Ledger().post_all(logged))
    assert [1, 2, 3] == [event.wal_sequence for event in logged]


async def test_engine_refuses_a_newer_schema(tmp_path: Path) -> None:
    """The engine refuses to start on a log with a record from a newer schema, and releases its lock."""
    settings = Settings(data_dir=tmp_path / "data")
    _write_log(settings, [codec.encode_body(SAMPLE_EVENTS[0]), _body("billing_reserve", 2, _reserve_wire(), 2)])
    for _ in range(2):  # the second attempt proves the failed one let go of the lock
        with pytest.raises(WalUnsupported):
            async with Engine.open(settings=settings):
                pass
