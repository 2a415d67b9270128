"""The SDK's results: frozen dataclasses with money as ``int`` micro-USD (parsed from the wire's strings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _micro(value: object) -> int:
    return int(value) if isinstance(value, str | int) and not isinstance(value, bool) else 0


def _optional_micro(value: object) -> int | None:
    return None if value is None else _micro(value)


def _overrun(value: object) -> Overrun | None:
    if not isinstance(value, Mapping):
        return None
    return Overrun(_micro(value["overrun_micro"]), _micro(value["collected_micro"]), _micro(value["uncollected_micro"]))


@dataclass(frozen=True, slots=True)
class RateSnapshot:
    """Exchange rates frozen when the hold was taken."""

    credit_units_per_usd: int
    usd_usdc_rate_ppm: int
    frozen_at_ms: int


@dataclass(frozen=True, slots=True)
class Overrun:
    """A commit above the hold: the excess, the part charged from available, the part not collected."""

    overrun_micro: int
    collected_micro: int
    uncollected_micro: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A billing entry (amounts in micro-USD)."""

    billing_entry_id: str
    account_id: str
    request_id: str
    kind: str
    state: str
    estimated_cost_micro: int
    actual_cost_micro: int | None
    charged_micro: int
    uncollected_micro: int
    estimated_cost_cu: int
    charged_cu: int
    expires_at_ms: int | None
    exchange_rate_snapshot: RateSnapshot
    correlation_id: str
    reason: str | None
    created_at_ms: int
    updated_at_ms: int
    wal_sequence: int
    replayed: bool
    response: Any  # the stored gateway response (JSON), or None
    overrun: Overrun | None = None  # set when the actual cost exceeded the hold

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Entry:
        """Parse an entry body."""
        return cls(
            body["billing_entry_id"],
            body["account_id"],
            body["request_id"],
            body["kind"],
            body["state"],
            _micro(body["estimated_cost_micro"]),
            _optional_micro(body["actual_cost_micro"]),
            _micro(body["charged_micro"]),
            _micro(body["uncollected_micro"]),
            body["estimated_cost_cu"],
            body["charged_cu"],
            body["expires_at_ms"],
            RateSnapshot(**body["exchange_rate_snapshot"]),
            body["correlation_id"],
            body["reason"],
            body["created_at_ms"],
            body["updated_at_ms"],
            body["wal_sequence"],
            body["replayed"],
            body.get("response"),
            _overrun(body.get("overrun")),
        )


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's balances in micro-USD and credit units."""

    account_id: str
    available_micro: int
    held_micro: int
    unsettled_micro: int
    charged_micro: int
    available_cu: int
    held_cu: int
    unsettled_cu: int
    charged_cu: int
    credit_units_per_usd: int
    wal_sequence: int
    exists: bool = True  # false: no credit or entry ever touched this account (a typo?)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Balance:
        """Parse a balance body."""
        return cls(
            body["account_id"],
            _micro(body["available_micro"]),
            _micro(body["held_micro"]),
            _micro(body["unsettled_micro"]),
            _micro(body["charged_micro"]),
            body["available_cu"],
            body["held_cu"],
            body["unsettled_cu"],
            body["charged_cu"],
            body["credit_units_per_usd"],
            body["wal_sequence"],
            body.get("exists", True) is not False,
        )


@dataclass(frozen=True, slots=True)
class CreditResult:
    """A mint, deduct or credit note, and the balance after it."""

    account_id: str
    credit_id: str
    kind: str
    amount_micro: int
    wal_sequence: int
    replayed: bool
    balance: Balance

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CreditResult:
        """Parse a credit body."""
        return cls(
            body["account_id"],
            body["credit_id"],
            body["kind"],
            _micro(body["amount_micro"]),
            body["wal_sequence"],
            body["replayed"],
            Balance.from_json(body["balance"]),
        )


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next_cursor`` back for the next one (None: the end)."""

    items: tuple[T, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter of the finalize queue."""

    message_id: str
    billing_entry_id: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a bulk replay of the dead letters did."""

    examined: int
    acked: int
    still_failing: int
    skipped: int
    refused: int = 0  # settlement finalized it but the entry was voided meanwhile: a discrepancy, alerted


@dataclass(frozen=True, slots=True)
class Price:
    """micro-USD per 1,000,000 tokens."""

    input_micro_per_mtok: int
    output_micro_per_mtok: int
