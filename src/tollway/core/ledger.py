"""The double-entry ledger: posting rules per event, and the invariants.

Each event posts to ledger accounts by a pure rule (SPEC §3); every event's postings sum to
zero, so the sum of all ledger balances is zero at every sequence. Accounts are named
``user:{account}:available``, ``user:{account}:held``, ``system:revenue``, ``system:funding``
and ``system:credit_notes``. A user's ``available`` and ``held`` may never go negative.

The ledger is *derived*: :class:`Ledger` folds events independently of the engine's state,
and :func:`check_invariants` compares the two. Agreement between two independent folds of
the same log is what the audit proves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tollway.core import events as ev
from tollway.core.lifecycle import UNSETTLED, EntryState
from tollway.core.state import State

REVENUE = "system:revenue"
FUNDING = "system:funding"
CREDIT_NOTES = "system:credit_notes"

Posting = tuple[str, int]


def available(account_id: str) -> str:
    """The ledger account of a user's spendable balance."""
    return f"user:{account_id}:available"


def held(account_id: str) -> str:
    """The ledger account of a user's reserved balance."""
    return f"user:{account_id}:held"


def postings(payload: ev.Payload) -> tuple[Posting, ...]:
    """The postings of one event; they always sum to zero."""
    match payload:
        case ev.CreditMint(account_id=a, amount_micro=n):
            return ((FUNDING, -n), (available(a), n))
        case ev.CreditDeduct(account_id=a, amount_micro=n):
            return ((available(a), -n), (FUNDING, n))
        case ev.X402CreditNote(account_id=a, amount_micro=n):
            return ((CREDIT_NOTES, -n), (available(a), n))
        case ev.BillingReserve(account_id=a, estimated_cost_micro=e):
            return ((available(a), -e), (held(a), e))
        case ev.BillingCommit(account_id=a, estimated_cost_micro=e, charged_micro=c):
            return ((held(a), -e), (REVENUE, c), (available(a), e - c))
        case (
            ev.BillingRelease(account_id=a, estimated_cost_micro=e)
            | ev.BillingReserveExpired(account_id=a, estimated_cost_micro=e)
        ):
            return ((held(a), -e), (available(a), e))
        case ev.BillingCharge(account_id=a, charged_micro=c):
            return ((available(a), -c), (REVENUE, c))
        case ev.BillingVoid(account_id=a, charged_micro=c):
            return ((REVENUE, -c), (available(a), c))
    return ()


@dataclass
class Ledger:
    """Ledger balances folded from events, independently of the engine's state."""

    balances: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_sequence: int = 0
    problems: list[str] = field(default_factory=list)

    def post(self, event: ev.Event) -> None:
        """Fold one event's postings, recording any rule it breaks."""
        lines = postings(event.payload)
        if sum(delta for _, delta in lines) != 0:
            self.problems.append(f"seq {event.wal_sequence}: {event.event_type} postings do not sum to zero")
        for name, delta in lines:
            self.balances[name] += delta
            if name.startswith("user:") and self.balances[name] < 0:
                self.problems.append(f"seq {event.wal_sequence}: {name} went negative")
        self.last_sequence = event.wal_sequence

    def post_all(self, events: Iterable[ev.Event]) -> Ledger:
        """Fold many events; returns self for chaining."""
        for event in events:
            self.post(event)
        return self

    def total(self) -> int:
        """The sum of every balance: zero in a sound ledger."""
        return sum(self.balances.values())


def state_balances(state: State) -> dict[str, int]:
    """The engine state expressed as ledger balances (zeros omitted)."""
    out: dict[str, int] = {REVENUE: state.revenue_micro, FUNDING: state.funding_micro}
    out[CREDIT_NOTES] = state.credit_notes_micro
    for account_id, account in state.accounts.items():
        out[available(account_id)] = account.available_micro
        out[held(account_id)] = account.held_micro
    return {name: value for name, value in out.items() if value != 0}


def check_invariants(state: State, ledger: Ledger | None = None) -> list[str]:
    """Every invariant of SPEC §3 over ``state``; an empty list means all hold."""
    problems = _entry_sums(state)
    balances = state_balances(state)
    if sum(balances.values()) != 0:
        problems.append(f"ledger does not sum to zero: {sum(balances.values())}")
    if ledger is not None:
        problems.extend(ledger.problems)
        folded = {name: value for name, value in ledger.balances.items() if value != 0}
        problems.extend(
            f"{name}: ledger fold {folded.get(name, 0)} != engine {balances.get(name, 0)}"
            for name in sorted(set(folded) | set(balances))
            if folded.get(name, 0) != balances.get(name, 0)
        )
    return problems


def _entry_sums(state: State) -> list[str]:
    """Each account's held, unsettled and charged balances equal the sums of its entries.

    Archived entries are no longer in the state; what they charged is in ``archived_charged``
    (they held nothing and were settled, so they add nothing to held or unsettled).
    """
    problems: list[str] = []
    held_by_account: dict[str, int] = defaultdict(int)
    unsettled_by_account: dict[str, int] = defaultdict(int)
    charged_by_account: dict[str, int] = defaultdict(int, state.archived_charged)
    for entry in state.entries.values():
        if entry.state is EntryState.RESERVE_HELD:
            held_by_account[entry.account_id] += entry.estimated_cost_micro
        if entry.state in UNSETTLED:
            unsettled_by_account[entry.account_id] += entry.charged_micro
        if entry.state is not EntryState.VOIDED:
            charged_by_account[entry.account_id] += entry.charged_micro
    for account_id, account in state.accounts.items():
        for name, value, expected in (
            ("held", account.held_micro, held_by_account.get(account_id, 0)),
            ("unsettled", account.unsettled_micro, unsettled_by_account.get(account_id, 0)),
            ("charged", account.charged_micro, charged_by_account.get(account_id, 0)),
        ):
            if value != expected:
                problems.append(f"{account_id}: {name} is {value} but its entries sum to {expected}")
        if account.available_micro < 0 or account.held_micro < 0:
            problems.append(f"{account_id}: negative balance")
    return problems
