"""When a node may serve a shard it holds a lease on, and when it must renew: a pure decision.

PostgreSQL's clock decides when a lease expires (``expires_at = now() + ttl`` at the acquire or
renew statement). A node cannot read that clock on every request, so it keeps its own,
stricter deadline on its monotonic clock: it reads the clock *before* sending the statement
(``sent_ms``), so ``sent_ms + ttl`` is never later than PostgreSQL's expiry in real time, and
it stops serving ``margin_ms`` earlier still, which covers the two clocks running at slightly
different rates and the time between the check and the answer. So a node has stopped
answering for a shard before anyone else can acquire it.

::

    sent_ms          sent_ms + renew_every_ms          sent_ms + ttl_ms - margin_ms   sent_ms + ttl_ms
       │  SERVE              │  RENEW (serve; renew now)            │  STOP                 │ (PostgreSQL may
       └─────────────────────┴──────────────────────────────────────┴───────────────────────┘  expire it after)

Pure: the caller passes the readings of its clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from tollway.core.errors import InvalidInput

DRIFT_SHARE_MIN: Final = 100
"""``margin_ms`` must be at least ``ttl_ms / 100``: clock rates of two machines differ by far less than 1 %."""


class LeaseAction(enum.Enum):
    """What a node does with a shard whose lease it holds."""

    SERVE = "serve"  # answer for the shard; no renewal due yet
    RENEW = "renew"  # answer for the shard, and send a renewal now
    STOP = "stop"  # stop answering for the shard at once: the lease may be gone soon


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """How long a lease lasts, how often it is renewed, and how early a node stops before it could expire."""

    ttl_ms: int = 5_000
    renew_every_ms: int = 1_000
    margin_ms: int = 500

    def __post_init__(self) -> None:
        if not 100 <= self.ttl_ms <= 600_000:
            raise InvalidInput(f"lease_ttl_ms must be 100 … 600000, not {self.ttl_ms}", field="lease_ttl_ms")
        if self.margin_ms < self.ttl_ms / DRIFT_SHARE_MIN:
            raise InvalidInput(
                f"lease_margin_ms must be at least 1 % of the lease ({self.ttl_ms} ms)", field="lease_margin_ms"
            )
        if not (self.renew_every_ms > 0 and self.renew_every_ms * 2 + self.margin_ms <= self.ttl_ms):
            raise InvalidInput(
                "lease_renew_every_ms must leave room for two renewals before the margin "
                f"(2 × {self.renew_every_ms} + {self.margin_ms} ≤ {self.ttl_ms})",
                field="lease_renew_every_ms",
            )

    def serve_until_ms(self, sent_ms: int) -> int:
        """The monotonic time from which a node must no longer answer for the shard."""
        return sent_ms + self.ttl_ms - self.margin_ms


def lease_action(timing: LeaseTiming, sent_ms: int, now_ms: int) -> LeaseAction:
    """What to do at ``now_ms`` with a lease last acquired or renewed by a statement sent at ``sent_ms``."""
    if now_ms >= timing.serve_until_ms(sent_ms):
        return LeaseAction.STOP
    if now_ms >= sent_ms + timing.renew_every_ms:
        return LeaseAction.RENEW
    return LeaseAction.SERVE
