"""Ledger properties: every event balances, folds are deterministic, invariants hold (SPEC §3)."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import payloads
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.commands import CreditKind, OverrunPolicy, Policy
from tollway.core.ledger import FUNDING, REVENUE, Ledger, available, check_invariants, held, postings
from tollway.core.state import State
from tollway.testing import MemoryEngine, fold

ACCOUNTS = ["a", "b", "c"]


@given(payloads)
def test_every_event_posts_to_zero(payload: ev.Payload) -> None:
    """Whatever the amounts, an event's postings sum to zero."""
    assert 0 == sum(delta for _, delta in postings(payload))


def test_posting_table_examples() -> None:
    """The postings of SPEC §3 for a commit with an overrun debit."""
    rate = ev.RateSnapshot(100, 1_000_000, 0)
    commit = ev.BillingCommit("a", 1_000, 1_300, 1_200, 100, "debit_available", False, rate)
    assert ((held("a"), -1_000), (REVENUE, 1_200), (available("a"), -200)) == postings(commit)
    assert ((FUNDING, -5), (available("a"), 5)) == postings(ev.CreditMint("a", "m", 5))
    assert () == postings(ev.BillingFinalizeAck("a", 5, "worker", 1, "FINALIZE_PENDING"))


def _random_commands(draw: st.DrawFn, engine: MemoryEngine, steps: int) -> None:
    for step in range(steps):
        account = draw(st.sampled_from(ACCOUNTS))
        open_ids = sorted(engine.state.entries)
        kind = draw(
            st.sampled_from(["mint", "reserve", "commit", "release", "expire", "charge", "void", "ack", "fail"])
        )
        target = draw(st.sampled_from(open_ids)) if open_ids else "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        amount = draw(st.integers(0, 5_000))
        command: cmd.Command
        match kind:
            case "mint":
                command = cmd.Credit(account, f"m{step}", CreditKind.MINT, amount + 1)
            case "reserve":
                command = cmd.Reserve(account, f"r{draw(st.integers(0, 8))}", amount, ttl_s=draw(st.integers(1, 20)))
            case "commit":
                command = cmd.Commit(target, amount)
            case "release":
                command = cmd.Release(target, "user_cancel")
            case "expire":
                engine.clock.advance(draw(st.integers(0, 15_000)))
                command = cmd.Expire(target)
            case "charge":
                command = cmd.Charge(account, f"c{step}", amount, allow_partial=draw(st.booleans()))
            case "void":
                command = cmd.Void(target, "because", "admin")
            case "ack":
                command = cmd.FinalizeAck(target)
            case _:
                command = cmd.FinalizeFail(target, "gave up", 5)
        engine.execute(command)


@st.composite
def workloads(draw: st.DrawFn) -> MemoryEngine:
    policy = Policy(
        finalize=draw(st.booleans()),
        overrun_policy=draw(st.sampled_from(list(OverrunPolicy))),
    )
    engine = MemoryEngine(policy)
    _random_commands(draw, engine, draw(st.integers(1, 60)))
    return engine


def _encoded(state: State) -> bytes:
    return msgspec.msgpack.encode(state.to_snapshot())


@settings(max_examples=150)
@given(workloads())
def test_invariants_hold_after_any_workload(engine: MemoryEngine) -> None:
    """After any sequence of commands the state and an independent ledger fold agree, and all invariants hold."""
    assert [] == check_invariants(engine.state, engine.ledger())
    assert 0 == engine.ledger().total()


@settings(max_examples=100)
@given(workloads())
def test_replay_is_deterministic(engine: MemoryEngine) -> None:
    """Folding the same log twice gives identical states, equal to the live one."""
    first, second = fold(engine.events), fold(engine.events)
    assert _encoded(first) == _encoded(second) == _encoded(engine.state)


@settings(max_examples=50)
@given(workloads())
def test_snapshot_round_trip_then_continue(engine: MemoryEngine) -> None:
    """A state restored from its snapshot folds the rest of the log to the same result."""
    half = len(engine.events) // 2
    prefix = fold(engine.events[:half])
    restored = State.from_snapshot(msgspec.msgpack.decode(_encoded(prefix), type=type(prefix.to_snapshot())))
    for event in engine.events[half:]:
        restored.apply(event)
    assert _encoded(engine.state) == _encoded(restored)
    assert (engine.state.held_count, engine.state.finalize_pending_count, engine.state.finalize_failed_count) == (
        restored.held_count,
        restored.finalize_pending_count,
        restored.finalize_failed_count,
    )


def test_ledger_reports_a_broken_event() -> None:
    """A hand-made event that overdraws is caught by the ledger fold."""
    rate = ev.RateSnapshot(100, 1_000_000, 0)
    bad = ev.Event(1, 0, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "untraced", ev.BillingReserve("a", "r", 5, 10, rate, "f"))
    ledger = Ledger().post_all([bad])
    assert ["seq 1: user:a:available went negative"] == ledger.problems
