"""The circuit breaker's pure decisions (SPEC §8) and the retry schedule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tollway.core.breaker import (
    Breaker,
    BreakerState,
    acquire,
    next_probe_at_ms,
    observe,
    record_failure,
    record_success,
    reset,
    summary,
    transition,
    view,
)
from tollway.core.retry import BACKOFF_SCHEDULE_MS, MAX_DLQ_RETRIES, Verdict, after_attempt, classify_status

OPEN, CLOSED, HALF = BreakerState.OPEN, BreakerState.CLOSED, BreakerState.HALF_OPEN


def failed(times: list[int]) -> Breaker:
    breaker = Breaker()
    for t in times:
        breaker = record_failure(breaker, t)
    return breaker


def test_five_failures_within_a_minute_open() -> None:
    """The fifth failure inside 60 s opens the breaker; four do not."""
    assert CLOSED == failed([0, 1, 2, 3]).state
    assert OPEN == failed([0, 1, 2, 3, 59_999]).state


def test_failures_outside_the_window_do_not_count() -> None:
    """Failures older than 60 s have expired by the time of the fifth."""
    assert CLOSED == failed([0, 1, 2, 3, 60_000]).state


def test_open_refuses_calls_until_cooldown() -> None:
    """While OPEN no call is allowed, and the permit says how long to wait."""
    breaker = failed([0, 0, 0, 0, 1_000])
    permit = acquire(breaker, 20_000)
    assert (False, 11_000) == (permit.allowed, permit.retry_in_ms)
    assert HALF == observe(breaker, 31_000).state


def test_exactly_one_probe() -> None:
    """In HALF_OPEN the first caller gets the probe and everyone else waits."""
    breaker = failed([0] * 5)
    first = acquire(breaker, 30_000)
    second = acquire(first.breaker, 30_001)
    assert (True, True) == (first.allowed, first.probe)
    assert (False, False) == (second.allowed, second.probe)


def test_probe_success_closes_failure_reopens() -> None:
    """The probe's outcome decides: success closes, failure opens with a new cooldown."""
    probing = acquire(failed([0] * 5), 30_000).breaker
    assert CLOSED == record_success(probing, 30_100).state
    reopened = record_failure(probing, 30_100)
    assert (OPEN, 30_100) == (reopened.state, reopened.opened_at_ms)
    assert not acquire(reopened, 60_000).allowed
    assert acquire(reopened, 60_100).allowed


def test_probe_without_outcome_counts_as_failure() -> None:
    """A probe with no outcome within its timeout re-opens the breaker."""
    probing = acquire(failed([0] * 5), 30_000).breaker
    timeout = probing.config.probe_timeout_ms
    assert HALF == observe(probing, 30_000 + timeout - 1).state
    assert OPEN == observe(probing, 30_000 + timeout).state


def test_late_failure_while_open_changes_nothing() -> None:
    """An outcome of a call made before the breaker opened does not extend the cooldown."""
    breaker = failed([0] * 5)
    assert breaker == record_failure(breaker, 10)


def test_reset_closes() -> None:
    """The admin reset forgets failures and closes."""
    assert Breaker() == reset(failed([0] * 5))


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20_000)), max_size=60))
def test_never_calls_while_open(steps: list[tuple[bool, int]]) -> None:
    """Whatever happens, a permit is never granted while the breaker is OPEN."""
    breaker, now = Breaker(), 0
    for success, gap in steps:
        now += gap
        permit = acquire(breaker, now)
        assert not (permit.allowed and observe(breaker, now).state is OPEN)
        breaker = permit.breaker
        if permit.allowed:
            breaker = record_success(breaker, now) if success else record_failure(breaker, now)


def test_status_classification() -> None:
    """200/409 ack, the listed 4xx poison at once, 5xx and 429 retry."""
    assert {200: Verdict.ACK, 409: Verdict.ACK, 400: Verdict.POISON, 401: Verdict.POISON, 403: Verdict.POISON} == {
        s: classify_status(s) for s in (200, 409, 400, 401, 403)
    }
    assert {Verdict.POISON} == {classify_status(s) for s in (404, 422)}
    assert {Verdict.RETRY} == {classify_status(s) for s in (429, 500, 502, 503, 504)}


def test_backoff_schedule_then_poison() -> None:
    """Transient failures retry after 1, 2, 4, 8 s; the fifth failed attempt goes to poison."""
    delays = [after_attempt(Verdict.RETRY, n, "503").delay_ms for n in range(1, MAX_DLQ_RETRIES)]
    assert list(BACKOFF_SCHEDULE_MS[: MAX_DLQ_RETRIES - 1]) == delays
    final = after_attempt(Verdict.RETRY, MAX_DLQ_RETRIES, "503")
    assert (Verdict.POISON, "503 (gave up after 5 attempts)") == (final.verdict, final.reason)
    assert Verdict.POISON == after_attempt(Verdict.POISON, 1, "422").verdict


def test_next_probe_time_follows_the_state() -> None:
    """OPEN: the cooldown's end; HALF_OPEN awaiting a probe: now; probe out or CLOSED: none."""
    opened = failed([0, 1, 2, 3, 10])
    half_open = acquire(opened, 30_010).breaker
    assert [30_010, 30_011, None, None] == [
        next_probe_at_ms(opened, 20),
        next_probe_at_ms(observe(opened, 30_011), 30_011),
        next_probe_at_ms(half_open, 30_020),
        next_probe_at_ms(Breaker(), 5),
    ]
    assert {"state": "OPEN", "next_probe_at_ms": 30_010, "next_probe_in_ms": 29_990} == {
        key: view(opened, 20)[key] for key in ("state", "next_probe_at_ms", "next_probe_in_ms")
    }


def test_transitions_name_their_reason_and_counts() -> None:
    """Opening counts the failures; cooldown, probe success, probe failure, probe timeout and reset say so."""
    four = failed([0, 1, 2, 3])
    opened = record_failure(four, 4)
    probing = acquire(opened, 30_004).breaker
    moves = [
        transition(four, opened, 4),
        transition(opened, observe(opened, 30_004), 30_004),
        transition(probing, record_success(probing, 30_005), 30_005),
        transition(probing, record_failure(probing, 30_005), 30_005),
        transition(probing, observe(probing, 35_004), 35_004),
        transition(opened, reset(opened), 9, admin_reset=True),
    ]
    assert [
        ("5 failures within 60000 ms", 5, 30_004),
        ("cooldown of 30000 ms over: the next call is the probe", 0, 30_004),
        ("the probe succeeded", 0, None),
        ("the probe failed", 0, 60_005),
        ("the probe had no outcome within 5000 ms", 0, 65_004),
        ("admin reset", 0, None),
    ] == [(m.reason, m.failures, m.next_probe_at_ms) for m in moves if m is not None]
    assert None is transition(four, record_failure(Breaker(), 5), 5)


def test_summary_counts_while_closed_and_names_the_next_probe_while_open() -> None:
    """A log line's breaker part: failures of the threshold while CLOSED, the wait for the probe while OPEN."""
    assert [
        "CLOSED, 2 of 5 failures within 60000 ms",
        "OPEN, next probe in 29990 ms",
    ] == [summary(failed([0, 1]), 5), summary(failed([0, 1, 2, 3, 10]), 20)]
