"""Wire schemas: the pydantic models that parse request bodies and document every answer.

Requests are strict: unknown fields are refused (a typo such as ``estimated_cost`` must not be
silently ignored), integers must be JSON integers, booleans JSON booleans. Amounts (``*_micro``)
accept a canonical decimal string or a JSON integer and are parsed by
:func:`~tollway.core.money.parse_micro`, the one strict parser. Ids are checked here for shape
(so the OpenAPI document says what is allowed) and again by the engine.

Response models describe what :mod:`tollway.api.wire` emits; handlers return those bodies
directly, so the models cost nothing per request but keep ``/openapi.json`` exact.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    ValidationInfo,
    WithJsonSchema,
)

from tollway.core.ids import MAX_ID_LENGTH
from tollway.core.money import MAX_MICRO_USD_LENGTH, parse_micro
from tollway.core.pricing import MAX_TOKENS
from tollway.core.validate import MAX_TEXT_LENGTH

MICRO_PATTERN = "^(0|[1-9][0-9]*)$"
ACCOUNT_PATTERN = "^[A-Za-z0-9._:@-]{1,128}$"
REQUEST_ID_PATTERN = "^[\\x21-\\x7e]{1,128}$"
ULID_PATTERN = "^[0-7][0-9A-HJKMNP-TV-Z]{25}$"


def _micro(value: object, info: ValidationInfo) -> int:
    return parse_micro(value, field=info.field_name or "amount_micro")


MicroIn = Annotated[
    int,
    BeforeValidator(_micro),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": f"^[0-9]{{1,{MAX_MICRO_USD_LENGTH}}}$"},
                {"type": "integer", "minimum": 0},
            ],
            "description": "micro-USD: a decimal string of digits (or a JSON integer), at most 2^63-1",
        }
    ),
]
MicroOut = Annotated[str, Field(pattern=MICRO_PATTERN, description="micro-USD as a canonical decimal string")]
AccountId = Annotated[str, Field(pattern=ACCOUNT_PATTERN, strict=True)]
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN, strict=True)]
Tokens = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)]
TtlSeconds = Annotated[StrictInt, Field(ge=1, le=7 * 86_400, description="seconds until the hold expires")]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_LENGTH, strict=True)]
CorrelationId = Annotated[str, Field(max_length=MAX_ID_LENGTH, strict=True)]
EntryStateName = Literal[
    "RESERVE_HELD", "COMMITTED", "FINALIZE_PENDING", "FINALIZE_ACKED", "FINALIZE_FAILED", "RELEASED", "VOIDED"
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReserveRequest(_Request):
    """Hold the worst-case cost: give ``estimated_cost_micro``, or ``model`` with token counts."""

    account_id: AccountId
    request_id: RequestId = Field(description="the idempotency key, unique per account")
    estimated_cost_micro: MicroIn | None = None
    model: Annotated[str, Field(min_length=1, max_length=128, strict=True)] | None = None
    input_tokens: Tokens | None = None
    max_output_tokens: Tokens | None = None
    ttl_s: TtlSeconds | None = None
    correlation_id: CorrelationId | None = None


class CommitRequest(_Request):
    """Charge the actual cost: ``actual_cost_micro``, or token counts priced with the hold's model."""

    actual_cost_micro: MicroIn | None = None
    model: Annotated[str, Field(min_length=1, max_length=128, strict=True)] | None = Field(
        default=None, description="defaults to the model the hold was priced with"
    )
    input_tokens: Tokens | None = None
    output_tokens: Tokens | None = None
    response: JsonValue = Field(default=None, description="the gateway's response (≤ 64 KiB of JSON), stored")


class ReleaseRequest(_Request):
    """Return a hold."""

    reason: Literal["pre_stream_failure", "user_cancel"]


class ExtendRequest(_Request):
    """Push a hold's expiry to ``ttl_s`` seconds from now (never shortens it)."""

    ttl_s: TtlSeconds


class ChargeRequest(_Request):
    """A single-phase charge without a hold, keyed by ``request_id``."""

    account_id: AccountId
    request_id: RequestId
    amount_micro: MicroIn
    allow_partial: StrictBool = False
    correlation_id: CorrelationId | None = None


class VoidRequest(_Request):
    """Refund a committed charge (admin)."""

    reason: Text


class CreditRequest(_Request):
    """Mint, deduct or credit-note an amount, idempotent on ``credit_id``."""

    credit_id: RequestId
    kind: Literal["mint", "deduct", "credit_note"]
    amount_micro: MicroIn
    reason: Annotated[str, Field(max_length=MAX_TEXT_LENGTH, strict=True)] = ""
    paid_micro_usdc: MicroIn | None = None
    correlation_id: CorrelationId | None = None


# -- responses -------------------------------------------------------------------------------


class RateSnapshotOut(BaseModel):
    """Exchange rates frozen when the hold was taken."""

    credit_units_per_usd: int
    usd_usdc_rate_ppm: int
    frozen_at_ms: int


class OverrunOut(BaseModel):
    """A commit whose actual cost exceeded the hold, and what the ``overrun_policy`` did with the excess."""

    overrun_micro: MicroOut = Field(description="actual cost minus the hold")
    collected_micro: MicroOut = Field(description="charged beyond the hold, from the available balance")
    uncollected_micro: MicroOut = Field(description="the excess not charged (cap policy, or not enough available)")


class EntryOut(BaseModel):
    """A billing entry."""

    billing_entry_id: Annotated[str, Field(pattern=ULID_PATTERN)]
    account_id: str
    request_id: str
    kind: Literal["reserve", "charge"]
    state: EntryStateName
    estimated_cost_micro: MicroOut
    actual_cost_micro: MicroOut | None
    charged_micro: MicroOut
    uncollected_micro: MicroOut
    estimated_cost_cu: int
    charged_cu: int
    expires_at_ms: int | None
    exchange_rate_snapshot: RateSnapshotOut
    correlation_id: str
    reason: str | None
    created_at_ms: int
    updated_at_ms: int
    wal_sequence: int
    replayed: bool = Field(description="true when an idempotent repeat was answered")
    response: JsonValue = Field(description="the stored gateway response, if the commit carried one")
    overrun: OverrunOut | None = Field(description="set when the actual cost exceeded the hold; null otherwise")


class EntryPageOut(BaseModel):
    """One page of an account's entries, in id (creation) order."""

    items: list[EntryOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at the end")


class BalanceOut(BaseModel):
    """An account's balances in micro-USD and credit units."""

    account_id: str
    exists: bool = Field(description="false for an account no credit or entry ever touched (all zeros): a typo?")
    available_micro: MicroOut
    held_micro: MicroOut
    unsettled_micro: MicroOut
    charged_micro: MicroOut
    available_cu: int
    held_cu: int
    unsettled_cu: int
    charged_cu: int
    credit_units_per_usd: int
    wal_sequence: int


class CreditOut(BaseModel):
    """A credit operation and the balance after it."""

    account_id: str
    credit_id: str
    kind: Literal["mint", "deduct", "credit_note"]
    amount_micro: MicroOut
    wal_sequence: int
    replayed: bool
    balance: BalanceOut


class ErrorOut(BaseModel):
    """Every error: a stable code, a message, and details (e.g. ``current_state``, ``deficit_micro``)."""

    model_config = ConfigDict(extra="allow")

    error: str
    message: str


class DeadLetterOut(BaseModel):
    """One dead letter of the finalize queue."""

    message_id: str
    billing_entry_id: str
    fields: dict[str, str]


class PoisonPageOut(BaseModel):
    """One page of dead letters."""

    items: list[DeadLetterOut]
    next_after: str | None = Field(description="pass as ?after= for the next page; null at the end")


class ReplayOut(BaseModel):
    """What a bulk replay of the dead letters did."""

    examined: int
    acked: int
    still_failing: int
    skipped: int
    refused: int = Field(description="settlement finalized it but the entry was voided meanwhile (alerted)")


class BreakerOut(BaseModel):
    """The settlement circuit breaker."""

    state: Literal["CLOSED", "OPEN", "HALF_OPEN"]
    value: int = Field(description="the metric's number: CLOSED 0, OPEN 1, HALF_OPEN 2")


class BreakerDetailOut(BreakerOut):
    """The settlement circuit breaker, with its counts and the next probe time."""

    failures: int = Field(description="failures within the window, counted towards opening (while CLOSED)")
    failure_threshold: int
    window_ms: int
    opened_at_ms: int | None = Field(description="when it last opened (while OPEN)")
    next_probe_at_ms: int | None = Field(
        description="when the next probe may go out (OPEN: the cooldown's end; HALF_OPEN: now); null while "
        "CLOSED or while the probe is out"
    )
    next_probe_in_ms: int | None


class GuardCheckOut(BaseModel):
    """One named check of the conservation guard and what it found."""

    name: str
    status: Literal["passed", "violated", "unavailable"]
    problems: list[str]


class GuardOut(BaseModel):
    """The conservation guard."""

    state: Literal["uninitialized", "ready", "degraded", "bypassed"]
    holds_allowed: bool
    recovery_stopped: bool
    reason: str | None
    retry_at_ms: int | None
    retry_after_seconds: int | None
    attempts: int
    checked_at_ms: int | None
    checked_sequence: int | None
    checks: list[GuardCheckOut]


class HealthOut(BaseModel):
    """Liveness."""

    status: Literal["ok"]


class ReadyOut(BaseModel):
    """Readiness and what it is made of."""

    ready: bool
    guard: GuardOut
    breaker: BreakerOut | None
    wal: dict[str, int]
    projection: dict[str, Any]
    redis: dict[str, Any] = Field(
        description="connected (the projector reaches Redis), error (what Redis answers while it takes nothing), "
        "embedded (the private redis-server: running, pid, restarts, down_since_ms, last_exit; null with redis_url)"
    )
    queues: dict[str, int] | None
    entries: dict[str, int]  # kept (in memory and Redis), archived (past the retention), retention_hours


class PricesOut(BaseModel):
    """The price table: micro-USD per 1,000,000 tokens, per model."""

    tokens_per_price_unit: int
    models: dict[str, dict[str, int]]
