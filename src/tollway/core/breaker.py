"""The circuit breaker on settlement calls: pure decisions from ``(breaker, now_ms)``.

::

    CLOSED ──(failure_threshold failures within window_ms)──▶ OPEN
    OPEN ──(cooldown_ms elapsed)──▶ HALF_OPEN
    HALF_OPEN ──(the one probe succeeds)──▶ CLOSED
    HALF_OPEN ──(the probe fails, or has no outcome within probe_timeout_ms)──▶ OPEN (new cooldown)

The breaker is a frozen record; every function returns a new one. The worker asks
:func:`acquire` before calling settlement, acts, then reports with :func:`record_success` or
:func:`record_failure`. While OPEN nothing is allowed, so no call is made and no attempt is
spent. In HALF_OPEN exactly one caller gets the probe; everyone else waits for its outcome.
The breaker reads no clock: ``now_ms`` is always passed in.

For operators, :func:`transition` describes a change of state (why, with the failure counts)
so the worker can log each one once, and :func:`view` is what the API shows: the state, the
failures counted and when the next probe may go out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Final

FAILURE_THRESHOLD: Final = 5
FAILURE_WINDOW_MS: Final = 60_000
COOLDOWN_MS: Final = 30_000
PROBE_TIMEOUT_MS: Final = 5_000


class BreakerState(enum.Enum):
    """Whether settlement may be called. Values are the metric's numbers."""

    CLOSED = 0  # calls flow; failures are counted
    OPEN = 1  # no calls until the cooldown ends
    HALF_OPEN = 2  # one probe call decides


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The breaker's limits (SPEC §8 defaults)."""

    failure_threshold: int = FAILURE_THRESHOLD
    window_ms: int = FAILURE_WINDOW_MS
    cooldown_ms: int = COOLDOWN_MS
    probe_timeout_ms: int = PROBE_TIMEOUT_MS


@dataclass(frozen=True, slots=True)
class Breaker:
    """The breaker at one moment."""

    state: BreakerState = BreakerState.CLOSED
    failures_ms: tuple[int, ...] = ()  # times of recent failures while CLOSED, oldest first
    opened_at_ms: int | None = None
    probe_started_ms: int | None = None  # set while the HALF_OPEN probe is out
    config: BreakerConfig = BreakerConfig()


def observe(breaker: Breaker, now_ms: int) -> Breaker:
    """The breaker as time has moved it: cooldowns end, overdue probes count as failures."""
    cfg = breaker.config
    opened, probe = breaker.opened_at_ms, breaker.probe_started_ms
    if breaker.state is BreakerState.OPEN and opened is not None and now_ms - opened >= cfg.cooldown_ms:
        return replace(breaker, state=BreakerState.HALF_OPEN, probe_started_ms=None)
    if breaker.state is BreakerState.HALF_OPEN and probe is not None and now_ms - probe >= cfg.probe_timeout_ms:
        return _open(breaker, now_ms)
    return breaker


@dataclass(frozen=True, slots=True)
class Permit:
    """The answer to "may I call settlement now?"."""

    allowed: bool
    probe: bool  # this call is the HALF_OPEN probe
    breaker: Breaker  # the breaker to keep
    retry_in_ms: int  # when not allowed: how long until asking again makes sense


def acquire(breaker: Breaker, now_ms: int) -> Permit:
    """Ask to make one settlement call at ``now_ms``."""
    current = observe(breaker, now_ms)
    cfg = current.config
    if current.state is BreakerState.CLOSED:
        return Permit(True, False, current, 0)
    if current.state is BreakerState.HALF_OPEN and current.probe_started_ms is None:
        return Permit(True, True, replace(current, probe_started_ms=now_ms), 0)
    if current.state is BreakerState.HALF_OPEN:
        assert current.probe_started_ms is not None
        wait_ms = cfg.probe_timeout_ms - (now_ms - current.probe_started_ms)
    else:
        assert current.opened_at_ms is not None
        wait_ms = cfg.cooldown_ms - (now_ms - current.opened_at_ms)
    return Permit(False, False, current, max(1, wait_ms))


def record_success(breaker: Breaker, now_ms: int) -> Breaker:
    """A call succeeded: a probe closes the breaker; in CLOSED nothing changes."""
    current = observe(breaker, now_ms)
    if current.state is BreakerState.HALF_OPEN and current.probe_started_ms is not None:
        return Breaker(config=current.config)
    return current


def record_failure(breaker: Breaker, now_ms: int) -> Breaker:
    """A call failed (transiently): count it, or re-open after a failed probe."""
    current = observe(breaker, now_ms)
    cfg = current.config
    if current.state is BreakerState.HALF_OPEN and current.probe_started_ms is not None:
        return _open(current, now_ms)
    if current.state is not BreakerState.CLOSED:
        return current  # a late outcome of a call made before the breaker opened
    recent = (*(t for t in current.failures_ms if now_ms - t < cfg.window_ms), now_ms)
    if len(recent) >= cfg.failure_threshold:
        return _open(current, now_ms)
    return replace(current, failures_ms=recent)


def reset(breaker: Breaker) -> Breaker:
    """Admin reset: CLOSED with no failures counted."""
    return Breaker(config=breaker.config)


def _open(breaker: Breaker, now_ms: int) -> Breaker:
    return Breaker(BreakerState.OPEN, (), now_ms, None, breaker.config)


def recent_failures(breaker: Breaker, now_ms: int) -> int:
    """Failures counted towards opening at ``now_ms`` (those within the window)."""
    return sum(1 for t in breaker.failures_ms if now_ms - t < breaker.config.window_ms)


def next_probe_at_ms(breaker: Breaker, now_ms: int) -> int | None:
    """When the next probe may go out: the cooldown's end while OPEN, now when HALF_OPEN awaits one.

    None while CLOSED (calls flow) and while the HALF_OPEN probe is out (its outcome decides).
    """
    current = observe(breaker, now_ms)
    if current.state is BreakerState.OPEN and current.opened_at_ms is not None:
        return current.opened_at_ms + current.config.cooldown_ms
    if current.state is BreakerState.HALF_OPEN and current.probe_started_ms is None:
        return now_ms
    return None


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of the breaker's state, for one log line."""

    from_state: BreakerState
    to_state: BreakerState
    reason: str
    failures: int  # failures within the window that led here (0 when not about failures)
    failure_threshold: int
    next_probe_at_ms: int | None


def transition(before: Breaker, after: Breaker, now_ms: int, *, admin_reset: bool = False) -> Transition | None:
    """How ``before`` became ``after`` at ``now_ms``; None when the state did not change."""
    if before.state is after.state:
        return None
    cfg, failures = before.config, 0
    if admin_reset:
        reason = "admin reset"
    elif after.state is BreakerState.HALF_OPEN:
        reason = f"cooldown of {cfg.cooldown_ms} ms over: the next call is the probe"
    elif after.state is BreakerState.CLOSED:
        reason = "the probe succeeded"
    elif before.state is BreakerState.CLOSED:
        failures = recent_failures(before, now_ms) + 1
        reason = f"{failures} failures within {cfg.window_ms} ms"
    elif before.probe_started_ms is not None and now_ms - before.probe_started_ms >= cfg.probe_timeout_ms:
        reason = f"the probe had no outcome within {cfg.probe_timeout_ms} ms"
    else:
        reason = "the probe failed"
    return Transition(
        before.state, after.state, reason, failures, cfg.failure_threshold, next_probe_at_ms(after, now_ms)
    )


def summary(breaker: Breaker, now_ms: int) -> str:
    """The breaker in a few words for a log line: its state and what it counts or waits for."""
    cfg = breaker.config
    if breaker.state is BreakerState.CLOSED:
        return (
            f"CLOSED, {recent_failures(breaker, now_ms)} of {cfg.failure_threshold} failures within {cfg.window_ms} ms"
        )
    next_probe = next_probe_at_ms(breaker, now_ms)
    return breaker.state.name if next_probe is None else f"{breaker.state.name}, next probe in {next_probe - now_ms} ms"


def view(breaker: Breaker, now_ms: int) -> dict[str, object]:
    """What the API shows: state, metric value, failures counted, threshold and the next probe time."""
    current = observe(breaker, now_ms)
    next_probe = next_probe_at_ms(current, now_ms)
    return {
        "state": current.state.name,
        "value": current.state.value,
        "failures": recent_failures(current, now_ms),
        "failure_threshold": current.config.failure_threshold,
        "window_ms": current.config.window_ms,
        "opened_at_ms": current.opened_at_ms,
        "next_probe_at_ms": next_probe,
        "next_probe_in_ms": None if next_probe is None else max(0, next_probe - now_ms),
    }
