"""The settlement simulator's book: each reservation finalized exactly once.

:func:`decide` is the whole rule, pure: the first call for a reservation finalizes it; a repeat
with the same account and amount is "already finalized"; a repeat with a different account or
amount is a *conflict* — also answered 409 (the reservation stays finalized as first recorded)
but remembered on the record, because it means the caller's books disagree with settlement's.
A full book refuses new reservations rather than forget old ones.

:class:`FinalizedBook` keeps the records in memory in the order they were finalized (which is
what the list's cursor counts) and turns them to and from JSON so a restarted simulator still
answers 409. Writing the file is the simulator's job; this module does no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any, Final

import msgspec

from tollway.core.errors import InvalidInput
from tollway.core.money import format_micro, parse_micro
from tollway.settlement.contract import DEFAULT_TENANT_ID, FinalizeRequest

RECORDS_MAX_DEFAULT: Final = 1_000_000
"""Reservations the book holds before it refuses new ones."""
CONFLICTS_KEPT_MAX: Final = 16
"""Conflicting repeats remembered per reservation (all are counted)."""
BOOK_FORMAT_VERSION: Final = 1


class Outcome(enum.Enum):
    """What one finalize call did to the book."""

    FINALIZED = "finalized"  # first call: recorded now (200)
    ALREADY_FINALIZED = "already_finalized"  # a repeat with the same data (409)
    CONFLICT = "conflict"  # a repeat with another account or amount (409, remembered)
    FULL = "full"  # a new reservation, but the book is full (507)


@dataclass(frozen=True, slots=True)
class Conflict:
    """A repeat that disagreed with the recorded finalization."""

    account_id: str
    actual_cost_micro: int
    trace_id: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Finalized:
    """One finalized reservation."""

    reservation_id: str
    account_id: str
    actual_cost_micro: int
    trace_id: str
    tenant_id: str
    finalized_at_ms: int
    calls: int = 1  # every finalize call for this reservation, the first included
    conflicts: tuple[Conflict, ...] = ()  # the first CONFLICTS_KEPT_MAX conflicting repeats
    conflicts_total: int = 0


def decide(
    existing: Finalized | None, request: FinalizeRequest, now_ms: int, *, full: bool
) -> tuple[Outcome, Finalized | None]:
    """The outcome of finalizing ``request`` and the record to keep (None: keep nothing)."""
    if existing is None:
        if full:
            return Outcome.FULL, None
        record = Finalized(
            request.billing_entry_id,
            request.account_id,
            request.actual_cost_micro,
            request.correlation_id,
            request.tenant_id,
            now_ms,
        )
        return Outcome.FINALIZED, record
    seen = replace(existing, calls=existing.calls + 1)
    if (request.account_id, request.actual_cost_micro) == (existing.account_id, existing.actual_cost_micro):
        return Outcome.ALREADY_FINALIZED, seen
    conflict = Conflict(request.account_id, request.actual_cost_micro, request.correlation_id, now_ms)
    kept = existing.conflicts + ((conflict,) if len(existing.conflicts) < CONFLICTS_KEPT_MAX else ())
    return Outcome.CONFLICT, replace(seen, conflicts=kept, conflicts_total=existing.conflicts_total + 1)


def to_item(record: Finalized) -> dict[str, Any]:
    """A record as the list endpoint shows it (and as the book file stores it)."""
    return {
        "reservationId": record.reservation_id,
        "accountId": record.account_id,
        "actualCostMicro": format_micro(record.actual_cost_micro),
        "traceId": record.trace_id,
        "tenantId": record.tenant_id,
        "finalized_at_ms": record.finalized_at_ms,
        "calls": record.calls,
        "conflicts": [
            {
                "accountId": c.account_id,
                "actualCostMicro": format_micro(c.actual_cost_micro),
                "traceId": c.trace_id,
                "at_ms": c.at_ms,
            }
            for c in record.conflicts
        ],
        "conflicts_total": record.conflicts_total,
    }


class FinalizedBook:
    """Finalized reservations in memory, in the order they were finalized."""

    __slots__ = ("_order", "_records", "records_max")

    def __init__(self, records_max: int = RECORDS_MAX_DEFAULT) -> None:
        self.records_max = records_max
        self._records: dict[str, Finalized] = {}
        self._order: list[str] = []

    def __len__(self) -> int:
        return len(self._order)

    def get(self, reservation_id: str) -> Finalized | None:
        """The record of ``reservation_id``, if finalized."""
        return self._records.get(reservation_id)

    def finalize(self, request: FinalizeRequest, now_ms: int) -> tuple[Outcome, Finalized | None]:
        """Apply :func:`decide` to the book; the outcome and the record as now kept."""
        existing = self._records.get(request.billing_entry_id)
        outcome, record = decide(existing, request, now_ms, full=len(self._order) >= self.records_max)
        if record is not None:
            if existing is None:
                self._order.append(record.reservation_id)
            self._records[record.reservation_id] = record
        return outcome, record

    def conflicts_total(self) -> int:
        """Conflicting repeats over all reservations."""
        return sum(record.conflicts_total for record in self._records.values())

    def page(self, cursor: str | None, limit: int) -> tuple[list[Finalized], str | None]:
        """Up to ``limit`` records after ``cursor`` (an opaque position) and the next cursor."""
        start = 0
        if cursor:
            if not cursor.isdecimal() or int(cursor) > len(self._order):
                raise InvalidInput("cursor is not one this list returned", field="cursor")
            start = int(cursor)
        end = min(start + limit, len(self._order))
        records = [self._records[reservation_id] for reservation_id in self._order[start:end]]
        return records, (str(end) if end < len(self._order) else None)

    def to_json(self) -> bytes:
        """The whole book as JSON, for the book file."""
        items = [to_item(self._records[reservation_id]) for reservation_id in self._order]
        return msgspec.json.encode({"version": BOOK_FORMAT_VERSION, "records": items})

    @classmethod
    def from_json(cls, data: bytes, records_max: int = RECORDS_MAX_DEFAULT) -> FinalizedBook:
        """A book from :meth:`to_json` output; :class:`InvalidInput` if it is not one."""
        try:
            document = msgspec.json.decode(data, type=_BookFile)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidInput(f"not a settlement book file: {exc}") from exc
        if document.version != BOOK_FORMAT_VERSION:
            raise InvalidInput(f"book file version {document.version} is not {BOOK_FORMAT_VERSION}")
        book = cls(records_max)
        for item in document.records:
            record = item.to_record()
            if book.get(record.reservation_id) is None:
                book._order.append(record.reservation_id)
            book._records[record.reservation_id] = record
        return book


class _ConflictFile(msgspec.Struct, frozen=True):
    account_id: str = msgspec.field(name="accountId")
    actual_cost_micro: str = msgspec.field(name="actualCostMicro")
    trace_id: str = msgspec.field(name="traceId")
    at_ms: int = 0


class _RecordFile(msgspec.Struct, frozen=True):
    reservation_id: str = msgspec.field(name="reservationId")
    account_id: str = msgspec.field(name="accountId")
    actual_cost_micro: str = msgspec.field(name="actualCostMicro")
    trace_id: str = msgspec.field(name="traceId")
    tenant_id: str = msgspec.field(name="tenantId", default=DEFAULT_TENANT_ID)
    finalized_at_ms: int = 0
    calls: int = 1
    conflicts: list[_ConflictFile] = msgspec.field(default_factory=list)
    conflicts_total: int = 0

    def to_record(self) -> Finalized:
        conflicts = tuple(
            Conflict(c.account_id, parse_micro(c.actual_cost_micro), c.trace_id, c.at_ms) for c in self.conflicts
        )
        return Finalized(
            self.reservation_id,
            self.account_id,
            parse_micro(self.actual_cost_micro),
            self.trace_id,
            self.tenant_id,
            self.finalized_at_ms,
            self.calls,
            conflicts,
            self.conflicts_total,
        )


class _BookFile(msgspec.Struct, frozen=True):
    version: int
    records: list[_RecordFile]
