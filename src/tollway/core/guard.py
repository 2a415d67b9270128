"""The conservation guard: pure checks of the state, and the guard's states and transitions.

The guard decides whether new holds and charges may be taken (SPEC §9). It is a frozen
:class:`Guard` record changed only by the functions below; the runtime part
(:mod:`tollway.guard`) runs the checks, keeps the record and pulls the engine's lever::

    UNINITIALIZED ──checks pass──▶ READY
          │                          │
          ├──a check is violated─────┴──▶ DEGRADED, recovery_stopped   (only an admin reset leaves it)
          └──a check could not run───────▶ DEGRADED, retry_at_ms        (retried with backoff)
    any state ──break-glass bypass──▶ BYPASSED                          (holds allowed, checks still reported)
    reset (admin) ──▶ UNINITIALIZED, then the checks run again

A *violated* invariant means money may already be wrong: nothing retries automatically,
because a retry that happens to pass would hide the problem; an operator audits and resets.
A check that *could not run* (Redis unreachable for the parity check) says nothing about the
money, so it is retried after ``RETRY_BASE_MS × 2^(attempts−1)``, capped at ``RETRY_CAP_MS``,
with ±12.5 % jitter so that many shards do not retry in lock-step.

The checks are named by the contract (``CHECK_NAMES``). :func:`run_checks` computes the six that
need only a :class:`~tollway.core.state.State` (and, optionally, an independent
:class:`~tollway.core.ledger.Ledger` fold of the WAL); ``projection_parity`` needs Redis and
is run by the runtime part. :func:`check_event` is the cheap per-event subset the runtime part
applies to every durable batch.

This module reads no clock and no randomness: ``now_ms`` and the jitter are arguments.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from tollway.core import events as ev
from tollway.core.errors import InvalidInput
from tollway.core.ledger import Ledger, check_invariants, state_balances
from tollway.core.lifecycle import EntryState
from tollway.core.money import INT64_MAX
from tollway.core.state import Entry, State

BUDGET_CONSERVATION: Final = "budget_conservation"
COST_NON_NEGATIVE: Final = "cost_non_negative"
RESERVE_WITHIN_ALLOCATION: Final = "reserve_within_allocation"
MICRO_USD_FORMAT: Final = "micro_usd_format"
RATE_CONSISTENCY: Final = "rate_consistency"
LEDGER_ZERO_SUM: Final = "ledger_zero_sum"
PROJECTION_PARITY: Final = "projection_parity"
STATE_CHECKS: Final = (
    BUDGET_CONSERVATION,
    COST_NON_NEGATIVE,
    RESERVE_WITHIN_ALLOCATION,
    MICRO_USD_FORMAT,
    RATE_CONSISTENCY,
    LEDGER_ZERO_SUM,
)
"""The checks :func:`run_checks` computes from a state, in this order."""
CHECK_NAMES: Final = (*STATE_CHECKS, PROJECTION_PARITY)

RETRY_BASE_MS: Final = 60_000
"""Delay before the first retry after a check could not run."""
RETRY_CAP_MS: Final = 10 * RETRY_BASE_MS
"""No retry waits longer than this, jitter included."""
JITTER_SPREAD_PERMILLE: Final = 125
"""The jitter's amplitude: ±12.5 % of the nominal delay."""
JITTER_PERMILLE_MAX: Final = 1000
"""A jitter argument ranges over ±this; ±1000 means the full ±12.5 %."""
PROBLEMS_PER_CHECK_MAX: Final = 20
"""Problems kept per check; the last one says how many more there were."""
_MAX_DOUBLINGS: Final = 16  # 60 s × 2^16 is far past the cap; stops 2^attempts from growing


class GuardState(enum.Enum):
    """Whether the guard lets new holds and charges through."""

    UNINITIALIZED = "uninitialized"  # startup checks have not finished: holds refused
    READY = "ready"  # every check passed: holds allowed
    DEGRADED = "degraded"  # a check failed or could not run: holds refused
    BYPASSED = "bypassed"  # break-glass: holds allowed whatever the checks say (audited)


class CheckStatus(enum.Enum):
    """The outcome of one check."""

    PASSED = "passed"  # the invariant holds
    VIOLATED = "violated"  # the invariant is broken: money may be wrong
    UNAVAILABLE = "unavailable"  # the check could not run (transient): says nothing about money


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One named check and what it found."""

    name: str
    status: CheckStatus
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Guard:
    """The guard at one moment."""

    state: GuardState = GuardState.UNINITIALIZED
    recovery_stopped: bool = False  # a violation was found: no automatic retry until an admin resets
    reason: str | None = None  # why it is not ready (or why it is bypassed)
    retry_at_ms: int | None = None  # when a transient failure is retried
    attempts: int = 0  # consecutive check runs that could not complete


# -- transitions ---------------------------------------------------------------------------


def holds_allowed(guard: Guard) -> bool:
    """Whether new holds and charges may be taken (commits and releases always may)."""
    return guard.state in (GuardState.READY, GuardState.BYPASSED)


def retry_delay_ms(attempts: int, jitter_permille: int) -> int:
    """The wait after the ``attempts``-th consecutive transient failure (1-based).

    ``RETRY_BASE_MS × 2^(attempts−1)``, moved by ``jitter_permille / 1000`` of ±12.5 % and
    clamped to ``RETRY_CAP_MS`` (so at the cap the jitter only shortens the wait).
    """
    if attempts < 1:
        raise InvalidInput(f"attempts must be at least 1, got {attempts}", field="attempts")
    if not -JITTER_PERMILLE_MAX <= jitter_permille <= JITTER_PERMILLE_MAX:
        raise InvalidInput(f"jitter_permille must be within ±{JITTER_PERMILLE_MAX}", field="jitter_permille")
    nominal = min(RETRY_BASE_MS << min(attempts - 1, _MAX_DOUBLINGS), RETRY_CAP_MS)
    jitter = nominal * JITTER_SPREAD_PERMILLE * jitter_permille // (1000 * JITTER_PERMILLE_MAX)
    return min(nominal + jitter, RETRY_CAP_MS)


def after_checks(guard: Guard, results: Sequence[CheckResult], now_ms: int, jitter_permille: int) -> Guard:
    """The guard after a run of ``results`` at ``now_ms``.

    A violation stops recovery; once stopped, no later run (even a passing one) clears it. A
    check that could not run schedules a retry. Bypassed stays bypassed and only records what
    was found.
    """
    violated = [result for result in results if result.status is CheckStatus.VIOLATED]
    unavailable = [result for result in results if result.status is CheckStatus.UNAVAILABLE]
    stopped = guard.recovery_stopped or bool(violated)
    reason = summarize(violated) if violated else guard.reason if guard.recovery_stopped else None
    if guard.state is GuardState.BYPASSED:
        return Guard(GuardState.BYPASSED, stopped, reason or guard.reason, None, 0)
    if stopped:
        return Guard(GuardState.DEGRADED, True, reason, None, guard.attempts)
    if unavailable:
        attempts = guard.attempts + 1
        retry_at = now_ms + retry_delay_ms(attempts, jitter_permille)
        return Guard(GuardState.DEGRADED, False, summarize(unavailable), retry_at, attempts)
    return Guard(GuardState.READY)


def bypass(guard: Guard, reason: str) -> Guard:
    """Break-glass: allow holds whatever the checks say. The caller audits and logs it."""
    return Guard(GuardState.BYPASSED, guard.recovery_stopped, reason, None, 0)


def reset(guard: Guard) -> Guard:
    """Admin reset: forget what was found, so the checks decide afresh. A bypass stays."""
    if guard.state is GuardState.BYPASSED:
        return Guard(GuardState.BYPASSED, False, guard.reason)
    return Guard()


def summarize(results: Iterable[CheckResult]) -> str:
    """``name: first problem (+N more); name: …`` for a status line."""
    parts = []
    for result in results:
        first = result.problems[0] if result.problems else result.status.value
        more = f" (+{len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        parts.append(f"{result.name}: {first}{more}")
    return "; ".join(parts)


def result(name: str, problems: Sequence[str], *, unavailable: bool = False) -> CheckResult:
    """A check's result from its problems (none: passed), keeping at most the first few."""
    if unavailable:
        return CheckResult(name, CheckStatus.UNAVAILABLE, tuple(problems[:PROBLEMS_PER_CHECK_MAX]))
    if not problems:
        return CheckResult(name, CheckStatus.PASSED)
    kept = list(problems[:PROBLEMS_PER_CHECK_MAX])
    if len(problems) > PROBLEMS_PER_CHECK_MAX:
        kept[-1] = f"... and {len(problems) - PROBLEMS_PER_CHECK_MAX + 1} more"
    return CheckResult(name, CheckStatus.VIOLATED, tuple(kept))


# -- the state checks ----------------------------------------------------------------------


def run_checks(state: State, ledger: Ledger | None = None) -> list[CheckResult]:
    """The six state checks, in ``STATE_CHECKS`` order. ``ledger``: an independent WAL fold."""
    return [
        result(BUDGET_CONSERVATION, check_invariants(state, ledger)),
        result(COST_NON_NEGATIVE, _cost_non_negative(state)),
        result(RESERVE_WITHIN_ALLOCATION, _reserve_within_allocation(state)),
        result(MICRO_USD_FORMAT, _micro_usd_format(state)),
        result(RATE_CONSISTENCY, _rate_consistency(state)),
        result(LEDGER_ZERO_SUM, _ledger_zero_sum(state, ledger)),
    ]


def _entry_amounts(entry: Entry) -> tuple[tuple[str, int], ...]:
    amounts = (
        ("estimated_cost_micro", entry.estimated_cost_micro),
        ("charged_micro", entry.charged_micro),
        ("uncollected_micro", entry.uncollected_micro),
    )
    if entry.actual_cost_micro is None:
        return amounts
    return (*amounts, ("actual_cost_micro", entry.actual_cost_micro))


def _user_amounts(state: State) -> Iterable[tuple[str, str, int]]:
    """Every public amount as (owner, field, value): entries and account balances."""
    for entry in state.entries.values():
        for name, value in _entry_amounts(entry):
            yield entry.billing_entry_id, name, value
    for account_id, account in state.accounts.items():
        yield account_id, "available_micro", account.available_micro
        yield account_id, "held_micro", account.held_micro
        yield account_id, "charged_micro", account.charged_micro
        yield account_id, "unsettled_micro", account.unsettled_micro


def _cost_non_negative(state: State) -> list[str]:
    """No entry amount and no account balance is negative."""
    return [f"{owner}: {name} is negative ({value})" for owner, name, value in _user_amounts(state) if value < 0]


def _reserve_within_allocation(state: State) -> list[str]:
    """Each account's held balance is the sum of its held estimates; nothing is overdrawn."""
    held: dict[str, int] = defaultdict(int)
    for entry in state.entries.values():
        if entry.state is EntryState.RESERVE_HELD:
            held[entry.account_id] += entry.estimated_cost_micro
    problems = [
        f"{account_id}: held {account.held_micro} != sum of held estimates {held.get(account_id, 0)}"
        for account_id, account in state.accounts.items()
        if account.held_micro != held.get(account_id, 0)
    ]
    problems += [
        f"{account_id}: holds on an unknown account" for account_id in held if account_id not in state.accounts
    ]
    problems += [
        f"{account_id}: available is negative ({account.available_micro})"
        for account_id, account in state.accounts.items()
        if account.available_micro < 0
    ]
    return problems


def _fits(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _micro_usd_format(state: State) -> list[str]:
    """Every amount is an integer in 0..INT64_MAX (the system source accounts may be negative)."""
    problems = [
        f"{owner}: {name} is outside 0..INT64_MAX ({value!r})"
        for owner, name, value in _user_amounts(state)
        if not _fits(value, 0, INT64_MAX)
    ]
    for name, value, low, high in (
        ("revenue", state.revenue_micro, 0, INT64_MAX),  # charges minus voids of those charges
        ("funding", state.funding_micro, -INT64_MAX, INT64_MAX),  # a clawback of a credit note can make it positive
        ("credit_notes", state.credit_notes_micro, -INT64_MAX, 0),
    ):
        if not _fits(value, low, high):
            problems.append(f"system:{name} is outside {low}..{high} ({value!r})")
    return problems


def _rate_problem(entry: Entry) -> str | None:
    rate = entry.rate
    if rate.credit_units_per_usd < 1 or rate.usd_usdc_rate_ppm < 1:
        return f"{entry.billing_entry_id}: rate snapshot is not positive ({rate})"
    if not 0 <= rate.frozen_at_ms <= entry.created_at_ms:
        return f"{entry.billing_entry_id}: rate frozen at {rate.frozen_at_ms}, after the entry was created"
    return None


def _rate_consistency(state: State) -> list[str]:
    """Each entry's rate snapshot is sane: positive rates, frozen no later than the entry began."""
    return [problem for entry in state.entries.values() if (problem := _rate_problem(entry)) is not None]


def _ledger_zero_sum(state: State, ledger: Ledger | None) -> list[str]:
    """The ledger balances of the state (and of the independent fold) sum to zero."""
    problems = []
    total = sum(state_balances(state).values())
    if total != 0:
        problems.append(f"engine ledger balances sum to {total}, not zero")
    if ledger is not None and ledger.total() != 0:
        problems.append(f"WAL ledger fold sums to {ledger.total()}, not zero")
    return problems


# -- per-event checks ----------------------------------------------------------------------


def check_event(event: ev.Event, state: State, changed: Entry | None = None) -> list[CheckResult]:
    """The violations one durable event shows on its own (empty when it is sound).

    Its amounts are MicroUSD (``micro_usd_format``, ``cost_non_negative``), and a commit uses
    the rate snapshot frozen into its hold (``rate_consistency``). Cheap enough for every event.
    ``changed`` is the entry as the event left it, when known: a commit that settled its entry
    left only an idempotency record in ``state``.
    """
    found: list[CheckResult] = []
    payload = event.payload
    for name in payload.MONEY_FIELDS:
        value = getattr(payload, name)
        if value is None or _fits(value, 0, INT64_MAX):
            continue
        check = COST_NON_NEGATIVE if isinstance(value, int) and value < 0 else MICRO_USD_FORMAT
        found.append(result(check, [f"seq {event.wal_sequence}: {event.event_type}.{name} = {value!r}"]))
    if isinstance(payload, ev.BillingCommit):
        entry = changed or state.entries.get(event.billing_entry_id)
        if entry is not None and entry.rate != payload.rate:
            problem = f"seq {event.wal_sequence}: commit rate {payload.rate} != reserve rate {entry.rate}"
            found.append(result(RATE_CONSISTENCY, [problem]))
    return found
