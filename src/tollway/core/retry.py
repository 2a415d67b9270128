"""Settlement outcomes and the retry schedule: pure lookups.

A settlement call ends in one of three ways:

- **ack** — 200 (finalized) or 409 (already finalized): record ``billing_finalize_ack``;
- **retry** — 5xx, 429, a timeout or a network error: try again after
  ``BACKOFF_SCHEDULE_MS[attempt - 1]``, until ``MAX_DLQ_RETRIES`` attempts were made;
- **poison** — 400, 401, 403, 404, 422 or data that cannot be sent: give up at once.

Anything not listed (an unexpected 3xx or 418) is treated as transient: retrying is safe
because the settlement call is idempotent (``Idempotency-Key``), and exhausting the retries
still ends in the poison stream where an admin sees it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

BACKOFF_SCHEDULE_MS: Final = (1000, 2000, 4000, 8000, 16000)
MAX_DLQ_RETRIES: Final = 5
ACK_STATUSES: Final = frozenset({200, 409})
TERMINAL_STATUSES: Final = frozenset({400, 401, 403, 404, 422})


class Verdict(enum.Enum):
    """What to do after one settlement attempt."""

    ACK = "ack"
    RETRY = "retry"
    POISON = "poison"


@dataclass(frozen=True, slots=True)
class Next:
    """The verdict for an attempt, with the delay before the next try when retrying."""

    verdict: Verdict
    delay_ms: int = 0
    reason: str = ""


def classify_status(status: int) -> Verdict:
    """Map an HTTP status from settlement to ack, retry or poison."""
    if status in ACK_STATUSES:
        return Verdict.ACK
    if status in TERMINAL_STATUSES:
        return Verdict.POISON
    return Verdict.RETRY


def after_attempt(verdict: Verdict, attempt: int, reason: str) -> Next:
    """What follows attempt number ``attempt`` (1-based) that ended with ``verdict``."""
    if verdict is not Verdict.RETRY:
        return Next(verdict, 0, reason)
    if attempt >= MAX_DLQ_RETRIES:
        return Next(Verdict.POISON, 0, f"{reason} (gave up after {attempt} attempts)")
    return Next(Verdict.RETRY, BACKOFF_SCHEDULE_MS[min(attempt, len(BACKOFF_SCHEDULE_MS)) - 1], reason)
