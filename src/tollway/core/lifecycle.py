"""The billing entry lifecycle: its states and the one table of allowed transitions.

Theory of operation
-------------------
A gateway *reserves* the worst-case cost of a model call before making it: the engine moves
the estimate from the account's available balance to its held balance and the entry is
``RESERVE_HELD``. Afterwards the gateway either *commits* the actual cost or *releases* the
hold. A commit moves the charged amount from held to revenue and returns the rest; in
standalone mode the entry is then ``COMMITTED`` (tollway is the final ledger), in settlement
mode it is ``FINALIZE_PENDING`` until the settlement worker records ``FINALIZE_ACKED`` or, after
giving up, ``FINALIZE_FAILED``. A hold that is neither committed nor released before its
``expires_at_ms`` is released by the expiry sweeper. An admin may *void* a committed charge,
which refunds it.

::

    IDLE ──reserve──▶ RESERVE_HELD ──commit──▶ COMMITTED ──void──▶ VOIDED
                           │        └─commit─▶ FINALIZE_PENDING ──ack──▶ FINALIZE_ACKED
                           │                         └──fail──▶ FINALIZE_FAILED ──ack──▶ FINALIZE_ACKED
                           └──release/expiry──▶ RELEASED                   └──void──▶ VOIDED

A direct charge (``billing_charge``) is single-phase: it goes from ``IDLE`` straight to where a
commit would land (``COMMITTED`` or ``FINALIZE_PENDING``), so a fee is voidable in standalone mode
and settled like any other charge in settlement mode. These two rows are the only extension of
the SPEC's table.

This module knows nothing about money or events; it only says which moves are legal. Every
state change in tollway goes through :func:`can_transition` (in ``decide``, through its one
helper that finds an entry for a verb), and an illegal move is refused before anything is
written. It also names the two kinds of entry and the ways a hold ends.
"""

from __future__ import annotations

import enum
from typing import Final


class EntryState(enum.Enum):
    """Where a billing entry is in its life."""

    IDLE = "IDLE"  # notional: the entry does not exist yet
    RESERVE_HELD = "RESERVE_HELD"  # the estimate is held; commit, release or expiry comes next
    COMMITTED = "COMMITTED"  # charged; standalone mode, tollway is the final ledger
    FINALIZE_PENDING = "FINALIZE_PENDING"  # charged; queued for the settlement service
    FINALIZE_ACKED = "FINALIZE_ACKED"  # the settlement service confirmed the charge (terminal)
    FINALIZE_FAILED = "FINALIZE_FAILED"  # settlement gave up; waits for an admin
    RELEASED = "RELEASED"  # the hold went back to available: release or expiry (terminal)
    VOIDED = "VOIDED"  # an admin refunded the charge (terminal)


class EntryKind(enum.StrEnum):
    """How an entry began (the value is what snapshots, the API and Redis carry)."""

    RESERVE = "reserve"  # a hold, then commit, release or expiry
    CHARGE = "charge"  # a direct, single-phase charge


class HoldEnd(enum.StrEnum):
    """Why a hold was released (an entry's ``reason`` in ``RELEASED``)."""

    PRE_STREAM_FAILURE = "pre_stream_failure"  # the gateway's model call failed before it streamed
    USER_CANCEL = "user_cancel"  # the user cancelled the request
    EXPIRED = "expired"  # neither committed nor released before ``expires_at_ms``: the sweeper ended it


S = EntryState

TRANSITIONS: Final[dict[EntryState, frozenset[EntryState]]] = {
    S.IDLE: frozenset({S.RESERVE_HELD, S.COMMITTED, S.FINALIZE_PENDING}),
    S.RESERVE_HELD: frozenset({S.COMMITTED, S.FINALIZE_PENDING, S.RELEASED}),
    S.COMMITTED: frozenset({S.VOIDED}),
    S.FINALIZE_PENDING: frozenset({S.FINALIZE_ACKED, S.FINALIZE_FAILED}),
    S.FINALIZE_FAILED: frozenset({S.FINALIZE_ACKED, S.VOIDED}),
    S.FINALIZE_ACKED: frozenset(),
    S.RELEASED: frozenset(),
    S.VOIDED: frozenset(),
}
"""The whole lifecycle. ``IDLE → COMMITTED | FINALIZE_PENDING`` is the direct charge."""

TERMINAL: Final = frozenset(state for state, targets in TRANSITIONS.items() if not targets)
UNSETTLED: Final = frozenset({S.FINALIZE_PENDING, S.FINALIZE_FAILED})
"""States whose charge the settlement service has not confirmed: the account's exposure."""
ARCHIVABLE: Final = frozenset({S.COMMITTED, S.FINALIZE_ACKED, S.RELEASED, S.VOIDED})
"""States an entry may be archived in (dropped from the state once older than the retention).

Everything but a live hold and an unsettled charge. ``COMMITTED`` is not terminal (an admin may
void it), so archiving one ends its void window: the retention is also how long a charge stays
voidable in standalone mode.
"""


def can_transition(current: EntryState, target: EntryState) -> bool:
    """Whether an entry in ``current`` may move to ``target``."""
    return target in TRANSITIONS[current]
