"""Commands the engine accepts, the policy that shapes its decisions, and typed outcomes.

A command is a frozen record of what a caller asked for, already parsed and validated for
form (ids and amounts). Whether it *can* be done is the business of
:mod:`tollway.core.decide`, which answers with a write, a replay of an earlier answer, or a
:class:`Refusal` — a value, not an exception, because "insufficient funds" is an ordinary
outcome a gateway must handle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import msgspec

from tollway.core.events import Payload, RateSnapshot
from tollway.core.lifecycle import HoldEnd
from tollway.core.money import DEFAULT_CREDIT_UNITS_PER_USD, MAX_REQUEST_COST_MICRO, PPM
from tollway.core.state import Account, Entry

RESERVE_TTL_SECONDS: Final = 300
MAX_PENDING_RISK_LIMIT_CU: Final = 500
MAX_PENDING_RECONCILIATION: Final = 50
MAX_STORED_RESPONSE_BYTES: Final = 64 * 1024
RELEASE_REASONS: Final = frozenset(end.value for end in HoldEnd if end is not HoldEnd.EXPIRED)


class OverrunPolicy(enum.Enum):
    """What a commit does when the actual cost exceeds the estimate."""

    DEBIT_AVAILABLE = "debit_available"  # take the excess from available, as far as it goes
    CAP = "cap"  # charge at most the estimate


class CreditKind(enum.Enum):
    """The three ways credit enters or leaves an account outside billing."""

    MINT = "mint"  # prepaid credit bought
    DEDUCT = "deduct"  # admin clawback
    CREDIT_NOTE = "credit_note"  # x402 refund note


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings that decisions depend on. Never read by ``apply``."""

    finalize: bool = False  # settlement mode: commits land in FINALIZE_PENDING
    overrun_policy: OverrunPolicy = OverrunPolicy.DEBIT_AVAILABLE
    max_request_cost_micro: int = MAX_REQUEST_COST_MICRO
    reserve_ttl_s: int = RESERVE_TTL_SECONDS
    reserve_ttl_s_max: int = 3600
    credit_units_per_usd: int = DEFAULT_CREDIT_UNITS_PER_USD
    usd_usdc_rate_ppm: int = PPM
    max_pending_risk_cu: int = MAX_PENDING_RISK_LIMIT_CU
    max_pending_reconciliation: int = MAX_PENDING_RECONCILIATION
    max_response_bytes: int = MAX_STORED_RESPONSE_BYTES
    holds_allowed: bool = True  # False while the conservation guard is not ready

    def rate(self, now_ms: int) -> RateSnapshot:
        """The exchange rates as of ``now_ms``, to freeze into a hold."""
        return RateSnapshot(self.credit_units_per_usd, self.usd_usdc_rate_ppm, now_ms)


# -- commands ------------------------------------------------------------------------------


class Reserve(msgspec.Struct, frozen=True, gc=False):
    """Hold ``estimated_cost_micro`` for one model call, keyed by ``request_id``."""

    account_id: str
    request_id: str
    estimated_cost_micro: int
    ttl_s: int | None = None
    correlation_id: str = "untraced"
    basis: str = ""  # how the estimate was made (model and tokens); part of the key's identity


class Commit(msgspec.Struct, frozen=True, gc=False):
    """Charge the actual cost of a held entry; optionally store the gateway's response."""

    billing_entry_id: str
    actual_cost_micro: int
    response_json: str | None = None


class Release(msgspec.Struct, frozen=True, gc=False):
    """Return a hold: the request failed before streaming, or the user cancelled."""

    billing_entry_id: str
    reason: str


class Extend(msgspec.Struct, frozen=True, gc=False):
    """Push a hold's expiry to ``ttl_s`` seconds from now."""

    billing_entry_id: str
    ttl_s: int


class Expire(msgspec.Struct, frozen=True, gc=False):
    """Release a hold whose expiry passed (the sweeper's command)."""

    billing_entry_id: str


class Charge(msgspec.Struct, frozen=True, gc=False):
    """A single-phase charge without a hold, keyed by ``request_id``."""

    account_id: str
    request_id: str
    amount_micro: int
    allow_partial: bool = False
    correlation_id: str = "untraced"


class Void(msgspec.Struct, frozen=True, gc=False):
    """An admin refund of a committed (or settlement-failed) charge."""

    billing_entry_id: str
    reason: str
    admin_id: str


class FinalizeAck(msgspec.Struct, frozen=True, gc=False):
    """The settlement service confirmed the charge."""

    billing_entry_id: str
    source: str = "worker"
    attempt: int = 0


class FinalizeFail(msgspec.Struct, frozen=True, gc=False):
    """Settlement gave up on the charge."""

    billing_entry_id: str
    reason: str
    attempts: int


class Credit(msgspec.Struct, frozen=True, gc=False):
    """Mint, deduct or credit-note ``amount_micro``, keyed by ``credit_id``."""

    account_id: str
    credit_id: str
    kind: CreditKind
    amount_micro: int
    reason: str = ""
    paid_micro_usdc: int | None = None
    correlation_id: str = "untraced"


class Note(msgspec.Struct, frozen=True, gc=False):
    """Record an operator action or finding in the log; no money moves."""

    payload: Payload
    correlation_id: str = "untraced"
    billing_entry_id: str | None = None  # the entry the note is about; a fresh id when None


class Archive(msgspec.Struct, frozen=True, gc=False):
    """The archiver's command: up to ``limit`` old entries and credit records.

    Entries whose last change is before ``older_than_ms``, then credit records made before it.
    """

    older_than_ms: int
    limit: int


Command = (
    Reserve | Commit | Release | Extend | Expire | Charge | Void | FinalizeAck | FinalizeFail | Credit | Note | Archive
)


# -- outcomes ------------------------------------------------------------------------------


class RefusalCode(enum.Enum):
    """Why a command was refused. The values are the stable error codes of the API."""

    INVALID_REQUEST = "invalid_request"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    PENDING_SETTLEMENT_LIMIT = "pending_settlement_limit"
    NOT_FOUND = "not_found"
    REQUEST_IN_PROGRESS = "request_in_progress"
    INVALID_TRANSITION = "invalid_transition"
    RESERVATION_EXPIRED = "reservation_expired"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    BILLING_SERVICE_UNAVAILABLE = "billing_service_unavailable"
    GUARD_UNAVAILABLE = "BILLING_EVALUATOR_UNAVAILABLE"


class Refusal(msgspec.Struct, frozen=True):
    """A command that was not done, and nothing was written."""

    code: RefusalCode
    message: str
    details: dict[str, object] = msgspec.field(default_factory=dict)


class EntryResult(msgspec.Struct, frozen=True, gc=False):
    """An entry after a command: ``created`` on a new hold or charge, ``replayed`` on a repeat."""

    entry: Entry
    replayed: bool = False
    created: bool = False
    response_json: str | None = None


class CreditResult(msgspec.Struct, frozen=True, gc=False):
    """The account after a credit operation."""

    account_id: str
    credit_id: str
    kind: CreditKind
    amount_micro: int
    wal_sequence: int
    balance: Account
    replayed: bool = False


class NoteResult(msgspec.Struct, frozen=True, gc=False):
    """The sequence at which a note was recorded."""

    wal_sequence: int


class ArchiveResult(msgspec.Struct, frozen=True, gc=False):
    """How many entries (``archived``) and credit records were archived, by the event at ``wal_sequence``."""

    archived: int
    wal_sequence: int
    credits: int = 0


Outcome = EntryResult | CreditResult | NoteResult | ArchiveResult | Refusal
