"""Lease timing (CLUSTER.md §3): a node serves, renews, and stops before PostgreSQL could expire its lease."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollway.core.errors import InvalidInput
from tollway.core.lease import LeaseAction, LeaseTiming, lease_action

TIMING = LeaseTiming(ttl_ms=5_000, renew_every_ms=1_000, margin_ms=500)


@pytest.mark.parametrize(
    ("elapsed_ms", "expected"),
    [
        (0, LeaseAction.SERVE),
        (999, LeaseAction.SERVE),
        (1_000, LeaseAction.RENEW),
        (4_499, LeaseAction.RENEW),
        (4_500, LeaseAction.STOP),
        (5_000, LeaseAction.STOP),
        (60_000, LeaseAction.STOP),
    ],
)
def test_serve_then_renew_then_stop(elapsed_ms: int, expected: LeaseAction) -> None:
    """Serve until a renewal is due, renew while serving, stop margin_ms before the lease could expire."""
    assert expected == lease_action(TIMING, 10_000, 10_000 + elapsed_ms)


@given(st.integers(100, 600_000), st.data())
def test_a_node_always_stops_before_the_lease_expires(ttl_ms: int, data: st.DataObject) -> None:
    """For any valid timing a node still serving at some moment is strictly before sent + ttl - margin."""
    margin_ms = data.draw(st.integers(-(-ttl_ms // 100), ttl_ms // 2))
    renew_every_ms = data.draw(st.integers(1, max(1, (ttl_ms - margin_ms) // 2)))
    timing = LeaseTiming(ttl_ms, renew_every_ms, margin_ms)
    sent_ms = data.draw(st.integers(0, 1 << 40))
    now_ms = data.draw(st.integers(sent_ms, sent_ms + 2 * ttl_ms))
    if lease_action(timing, sent_ms, now_ms) is not LeaseAction.STOP:
        assert now_ms < sent_ms + ttl_ms - margin_ms


@pytest.mark.parametrize(
    ("ttl_ms", "renew_every_ms", "margin_ms"),
    [(50, 10, 10), (5_000, 1_000, 10), (5_000, 2_400, 500), (5_000, 0, 500)],
)
def test_unsafe_timings_are_refused(ttl_ms: int, renew_every_ms: int, margin_ms: int) -> None:
    """A too short lease, a margin under 1 %, or no room for two renewals is refused."""
    with pytest.raises(InvalidInput):
        LeaseTiming(ttl_ms, renew_every_ms, margin_ms)
