"""Decisions of the pure core, one behaviour at a time (SPEC §2, §6, §8 caps), through MemoryEngine."""

from __future__ import annotations

import msgspec
import pytest

from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.commands import CreditKind, EntryResult, OverrunPolicy, Policy, Refusal, RefusalCode
from tollway.core.errors import InvalidInput
from tollway.core.lifecycle import EntryState
from tollway.testing import MemoryEngine

S = EntryState


def funded(amount: int = 1_000_000, policy: Policy | None = None) -> MemoryEngine:
    engine = MemoryEngine(policy)
    engine.execute(cmd.Credit("acct", "mint-0", CreditKind.MINT, amount))
    return engine


def held(engine: MemoryEngine, request_id: str = "req", estimate: int = 1_000, **kw: object) -> EntryResult:
    result = engine.execute(cmd.Reserve("acct", request_id, estimate, **kw))  # type: ignore[arg-type]
    assert isinstance(result, EntryResult), result
    return result


def refusal(result: cmd.Outcome) -> RefusalCode:
    assert isinstance(result, Refusal), result
    return result.code


def test_reserve_moves_estimate_to_held() -> None:
    """A hold takes the estimate from available into held, freezing the rates."""
    engine = funded(5_000)
    result = held(engine, estimate=2_000)
    account = engine.state.account("acct")
    assert (3_000, 2_000) == (account.available_micro, account.held_micro)
    assert S.RESERVE_HELD == result.entry.state
    assert result.created
    assert 100 == result.entry.rate.credit_units_per_usd


def test_insufficient_funds_details() -> None:
    """The refusal names available, requested and deficit in micro and CU, and writes nothing."""
    engine = funded(15_000)
    before = len(engine.events)
    result = engine.execute(cmd.Reserve("acct", "req", 40_000))
    assert isinstance(result, Refusal)
    assert RefusalCode.INSUFFICIENT_FUNDS == result.code
    expected = {
        "available_micro": 15_000,
        "requested_micro": 40_000,
        "deficit_micro": 25_000,
        "available_cu": 1,
        "requested_cu": 4,
        "deficit_cu": 3,
    }
    assert expected == result.details
    assert before == len(engine.events)


def test_reserve_exactly_available_succeeds_and_one_more_fails() -> None:
    """available ≥ estimate is the rule: equality passes, one micro more does not."""
    engine = funded(1_000)
    held(engine, "a", 1_000)
    assert RefusalCode.INSUFFICIENT_FUNDS == refusal(engine.execute(cmd.Reserve("acct", "b", 1)))


def test_idempotent_reserve_semantics() -> None:
    """Same key while held → in progress; other params → key reused; after commit → replay with response."""
    engine = funded()
    first = held(engine)
    assert RefusalCode.REQUEST_IN_PROGRESS == refusal(engine.execute(cmd.Reserve("acct", "req", 1_000)))
    assert RefusalCode.IDEMPOTENCY_KEY_REUSED == refusal(engine.execute(cmd.Reserve("acct", "req", 999)))
    engine.execute(cmd.Commit(first.entry.billing_entry_id, 700, response_json='{"text": "hi"}'))
    again = engine.execute(cmd.Reserve("acct", "req", 1_000))
    assert isinstance(again, EntryResult)
    assert (True, False, '{"text": "hi"}') == (again.replayed, again.created, again.response_json)
    assert first.entry.billing_entry_id == again.entry.billing_entry_id
    assert 1 == len(engine.state.entries) + len(engine.state.settled)


def test_released_key_replays_the_released_entry() -> None:
    """A retry of a released request gets that entry back; a new attempt needs a new key."""
    engine = funded()
    first = held(engine)
    engine.execute(cmd.Release(first.entry.billing_entry_id, "pre_stream_failure"))
    again = engine.execute(cmd.Reserve("acct", "req", 1_000))
    assert isinstance(again, EntryResult)
    assert (S.RELEASED, True) == (again.entry.state, again.replayed)


def test_request_keys_are_per_account() -> None:
    """The same request_id on another account is a different request."""
    engine = funded()
    engine.execute(cmd.Credit("other", "mint-1", CreditKind.MINT, 5_000))
    held(engine, "shared")
    assert isinstance(engine.execute(cmd.Reserve("other", "shared", 1_000)), EntryResult)


@pytest.mark.parametrize(
    ("policy", "available", "actual", "charged", "uncollected"),
    [
        (OverrunPolicy.DEBIT_AVAILABLE, 10_000, 600, 600, 0),
        (OverrunPolicy.DEBIT_AVAILABLE, 10_000, 1_500, 1_500, 0),
        (OverrunPolicy.DEBIT_AVAILABLE, 200, 1_500, 1_200, 300),
        (OverrunPolicy.DEBIT_AVAILABLE, 0, 1_500, 1_000, 500),
        (OverrunPolicy.CAP, 10_000, 1_500, 1_000, 500),
        (OverrunPolicy.CAP, 10_000, 400, 400, 0),
    ],
)
def test_commit_and_overrun_policies(
    policy: OverrunPolicy, available: int, actual: int, charged: int, uncollected: int
) -> None:
    """Under the estimate the rest returns; over it, the policy decides and the remainder is uncollected."""
    engine = funded(1_000 + available, Policy(overrun_policy=policy))
    entry = held(engine, estimate=1_000).entry
    result = engine.execute(cmd.Commit(entry.billing_entry_id, actual))
    assert isinstance(result, EntryResult)
    assert (S.COMMITTED, actual, charged, uncollected) == (
        result.entry.state,
        result.entry.actual_cost_micro,
        result.entry.charged_micro,
        result.entry.uncollected_micro,
    )
    account = engine.state.account("acct")
    assert (1_000 + available - charged, 0, charged) == (
        account.available_micro,
        account.held_micro,
        account.charged_micro,
    )


def test_settlement_mode_commit_is_pending_and_counts_as_unsettled() -> None:
    """With settlement configured a commit lands in FINALIZE_PENDING and its charge is exposure."""
    engine = funded(policy=Policy(finalize=True))
    entry = held(engine).entry
    result = engine.execute(cmd.Commit(entry.billing_entry_id, 800))
    assert isinstance(result, EntryResult)
    assert S.FINALIZE_PENDING == result.entry.state
    assert 800 == engine.state.account("acct").unsettled_micro
    engine.execute(cmd.FinalizeAck(entry.billing_entry_id))
    assert 0 == engine.state.account("acct").unsettled_micro


def test_commit_repeat_replays_and_different_amount_is_invalid_transition() -> None:
    """Commit is idempotent; a commit with another amount is a different operation."""
    engine = funded()
    entry = held(engine).entry
    engine.execute(cmd.Commit(entry.billing_entry_id, 500))
    again = engine.execute(cmd.Commit(entry.billing_entry_id, 500))
    assert isinstance(again, EntryResult)
    assert again.replayed
    other = engine.execute(cmd.Commit(entry.billing_entry_id, 501))
    assert isinstance(other, Refusal)
    assert (RefusalCode.INVALID_TRANSITION, "COMMITTED") == (other.code, other.details["current_state"])


def test_release_then_commit_is_invalid_transition() -> None:
    """A released hold cannot be committed; nothing is written."""
    engine = funded()
    entry = held(engine).entry
    engine.execute(cmd.Release(entry.billing_entry_id, "user_cancel"))
    count = len(engine.events)
    assert RefusalCode.INVALID_TRANSITION == refusal(engine.execute(cmd.Commit(entry.billing_entry_id, 1)))
    assert count == len(engine.events)


def test_release_reason_must_be_known() -> None:
    """Only pre_stream_failure and user_cancel release a hold."""
    engine = funded()
    entry = held(engine).entry
    assert RefusalCode.INVALID_REQUEST == refusal(engine.execute(cmd.Release(entry.billing_entry_id, "bored")))


def test_commit_after_expiry_is_refused_even_before_the_sweeper() -> None:
    """An expired hold can never be committed or released, swept or not."""
    engine = funded()
    entry = held(engine, ttl_s=10).entry
    engine.clock.advance(10_000)
    assert RefusalCode.RESERVATION_EXPIRED == refusal(engine.execute(cmd.Commit(entry.billing_entry_id, 1)))
    assert RefusalCode.RESERVATION_EXPIRED == refusal(
        engine.execute(cmd.Release(entry.billing_entry_id, "user_cancel"))
    )
    swept = engine.execute(cmd.Expire(entry.billing_entry_id))
    assert isinstance(swept, EntryResult)
    assert RefusalCode.RESERVATION_EXPIRED == refusal(engine.execute(cmd.Commit(entry.billing_entry_id, 1)))
    assert (1_000_000, 0) == (engine.state.account("acct").available_micro, engine.state.account("acct").held_micro)


def test_extend_pushes_expiry_forward_only() -> None:
    """extend moves expires_at later; a shorter ttl changes nothing and writes nothing."""
    engine = funded()
    entry = held(engine, ttl_s=10).entry
    engine.clock.advance(5_000)
    longer = engine.execute(cmd.Extend(entry.billing_entry_id, 60))
    assert isinstance(longer, EntryResult)
    assert engine.clock.now + 60_000 == longer.entry.expires_at_ms
    count = len(engine.events)
    shorter = engine.execute(cmd.Extend(entry.billing_entry_id, 1))
    assert isinstance(shorter, EntryResult)
    assert (count, longer.entry.expires_at_ms) == (len(engine.events), shorter.entry.expires_at_ms)
    engine.clock.advance(30_000)
    assert isinstance(engine.execute(cmd.Commit(entry.billing_entry_id, 10)), EntryResult)


def test_ttl_bounds() -> None:
    """A ttl of zero or above the configured maximum is invalid."""
    engine = funded()
    for ttl in (0, 3601):
        assert RefusalCode.INVALID_REQUEST == refusal(engine.execute(cmd.Reserve("acct", f"t{ttl}", 1, ttl_s=ttl)))


def test_amount_above_request_limit_is_invalid() -> None:
    """No single reservation or charge may exceed max_request_cost_micro."""
    engine = funded(policy=Policy(max_request_cost_micro=500))
    assert RefusalCode.INVALID_REQUEST == refusal(engine.execute(cmd.Reserve("acct", "r", 501)))
    assert RefusalCode.INVALID_REQUEST == refusal(engine.execute(cmd.Charge("acct", "c", 501)))


def test_direct_charge_all_or_nothing_and_partial() -> None:
    """A charge takes all or nothing, or clamps to available with allow_partial."""
    engine = funded(1_000)
    assert RefusalCode.INSUFFICIENT_FUNDS == refusal(engine.execute(cmd.Charge("acct", "c1", 1_500)))
    partial = engine.execute(cmd.Charge("acct", "c2", 1_500, allow_partial=True))
    assert isinstance(partial, EntryResult)
    assert (S.COMMITTED, 1_000, 500) == (
        partial.entry.state,
        partial.entry.charged_micro,
        partial.entry.uncollected_micro,
    )
    assert RefusalCode.INSUFFICIENT_FUNDS == refusal(engine.execute(cmd.Charge("acct", "c3", 1, allow_partial=True)))
    again = engine.execute(cmd.Charge("acct", "c2", 1_500, allow_partial=True))
    assert isinstance(again, EntryResult)
    assert again.replayed


def test_void_refunds_and_is_idempotent() -> None:
    """A void returns the charge to available; repeating it replays."""
    engine = funded(10_000)
    entry = held(engine, estimate=4_000).entry
    engine.execute(cmd.Commit(entry.billing_entry_id, 3_000))
    voided = engine.execute(cmd.Void(entry.billing_entry_id, "customer complaint", "admin-1"))
    assert isinstance(voided, EntryResult)
    assert (S.VOIDED, 10_000, 0) == (
        voided.entry.state,
        engine.state.account("acct").available_micro,
        engine.state.revenue_micro,
    )
    again = engine.execute(cmd.Void(entry.billing_entry_id, "customer complaint", "admin-1"))
    assert isinstance(again, EntryResult)
    assert again.replayed


def test_void_needs_a_reason() -> None:
    """A void without a reason is bad input and changes nothing."""
    engine = funded()
    entry = held(engine).entry
    engine.execute(cmd.Commit(entry.billing_entry_id, 10))
    with pytest.raises(InvalidInput):
        engine.execute(cmd.Void(entry.billing_entry_id, " ", "admin"))


def test_void_of_pending_or_held_is_invalid_transition() -> None:
    """Only COMMITTED and FINALIZE_FAILED entries can be voided."""
    engine = funded(policy=Policy(finalize=True))
    entry = held(engine).entry
    assert RefusalCode.INVALID_TRANSITION == refusal(engine.execute(cmd.Void(entry.billing_entry_id, "r", "a")))
    engine.execute(cmd.Commit(entry.billing_entry_id, 10))
    assert RefusalCode.INVALID_TRANSITION == refusal(engine.execute(cmd.Void(entry.billing_entry_id, "r", "a")))
    engine.execute(cmd.FinalizeFail(entry.billing_entry_id, "settlement said 422", 1))
    assert isinstance(engine.execute(cmd.Void(entry.billing_entry_id, "r", "a")), EntryResult)


def test_finalize_failed_can_still_be_acked_by_replay() -> None:
    """FINALIZE_FAILED → FINALIZE_ACKED is the admin replay path."""
    engine = funded(policy=Policy(finalize=True))
    entry = held(engine).entry
    engine.execute(cmd.Commit(entry.billing_entry_id, 10))
    engine.execute(cmd.FinalizeFail(entry.billing_entry_id, "timeout", 5))
    assert 1 == engine.state.finalize_failed_count
    result = engine.execute(cmd.FinalizeAck(entry.billing_entry_id, source="replay"))
    assert isinstance(result, EntryResult)
    assert (S.FINALIZE_ACKED, 0) == (result.entry.state, engine.state.finalize_failed_count)


def test_risk_cap_refuses_new_holds_and_lifts() -> None:
    """Unsettled exposure above the cap blocks new holds with pending_settlement_limit until settled."""
    engine = funded(100_000_000, Policy(finalize=True, max_pending_risk_cu=500))
    entry = held(engine, "big", 5_000_001).entry  # 500.0001 CU at 100 CU/USD
    engine.execute(cmd.Commit(entry.billing_entry_id, 5_000_001))
    assert RefusalCode.PENDING_SETTLEMENT_LIMIT == refusal(engine.execute(cmd.Reserve("acct", "next", 1)))
    engine.execute(cmd.FinalizeAck(entry.billing_entry_id))
    assert isinstance(engine.execute(cmd.Reserve("acct", "next", 1)), EntryResult)


def test_reconciliation_cap_refuses_new_holds() -> None:
    """When FINALIZE_FAILED entries reach the cap, new holds get billing_service_unavailable."""
    engine = funded(policy=Policy(finalize=True, max_pending_reconciliation=2))
    ids = []
    for i in range(2):
        entry = held(engine, f"r{i}", 10).entry
        engine.execute(cmd.Commit(entry.billing_entry_id, 10))
        engine.execute(cmd.FinalizeFail(entry.billing_entry_id, "gone", 5))
        ids.append(entry.billing_entry_id)
    result = engine.execute(cmd.Reserve("acct", "blocked", 1))
    assert isinstance(result, Refusal)
    assert (RefusalCode.BILLING_SERVICE_UNAVAILABLE, 30) == (result.code, result.details["retry_after_seconds"])
    engine.execute(cmd.Void(ids[0], "written off", "admin"))
    assert isinstance(engine.execute(cmd.Reserve("acct", "blocked", 1)), EntryResult)


def test_guard_gate_blocks_holds_and_charges_but_not_commits() -> None:
    """While holds are not allowed, reserves and charges are refused; commits still go through."""
    engine = funded()
    entry = held(engine).entry
    engine.policy = Policy(holds_allowed=False)
    assert RefusalCode.GUARD_UNAVAILABLE == refusal(engine.execute(cmd.Reserve("acct", "r2", 1)))
    assert RefusalCode.GUARD_UNAVAILABLE == refusal(engine.execute(cmd.Charge("acct", "c", 1)))
    assert isinstance(engine.execute(cmd.Commit(entry.billing_entry_id, 5)), EntryResult)


def test_credit_idempotency_and_deduct_limits() -> None:
    """Credits replay on the same id, refuse a reused id, and a deduct cannot overdraw."""
    engine = funded(1_000)
    again = engine.execute(cmd.Credit("acct", "mint-0", CreditKind.MINT, 1_000))
    assert isinstance(again, cmd.CreditResult)
    assert again.replayed
    assert RefusalCode.IDEMPOTENCY_KEY_REUSED == refusal(
        engine.execute(cmd.Credit("acct", "mint-0", CreditKind.MINT, 2_000))
    )
    assert RefusalCode.INSUFFICIENT_FUNDS == refusal(
        engine.execute(cmd.Credit("acct", "claw-1", CreditKind.DEDUCT, 1_001))
    )
    note = engine.execute(cmd.Credit("acct", "note-1", CreditKind.CREDIT_NOTE, 50))
    assert isinstance(note, cmd.CreditResult)
    assert (1_050, -1_000, -50) == (
        note.balance.available_micro,
        engine.state.funding_micro,
        engine.state.credit_notes_micro,
    )
    assert RefusalCode.INVALID_REQUEST == refusal(engine.execute(cmd.Credit("acct", "zero", CreditKind.MINT, 0)))


def test_unknown_entry_is_not_found() -> None:
    """Commands on an entry that does not exist are refused with not_found."""
    engine = funded()
    missing = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    for command in (
        cmd.Commit(missing, 1),
        cmd.Release(missing, "user_cancel"),
        cmd.Extend(missing, 10),
        cmd.Void(missing, "r", "a"),
        cmd.FinalizeAck(missing),
    ):
        assert RefusalCode.NOT_FOUND == refusal(engine.execute(command))


def test_stored_response_size_limit() -> None:
    """A response above max_response_bytes is refused and the hold stays."""
    engine = funded(policy=Policy(max_response_bytes=10))
    entry = held(engine).entry
    result = engine.execute(cmd.Commit(entry.billing_entry_id, 5, response_json='{"x": "0123456789"}'))
    assert RefusalCode.INVALID_REQUEST == refusal(result)
    assert S.RESERVE_HELD == engine.state.entries[entry.billing_entry_id].state


@pytest.mark.parametrize(
    "command",
    [
        cmd.Reserve("bad account", "r", 1),
        cmd.Reserve("acct", "has space", 1),
        cmd.Reserve("acct", "r", -1),
        cmd.Commit("not-a-ulid", 1),
        cmd.Charge("acct", "r", 2**63),
        cmd.Credit("acct", "c", CreditKind.MINT, -5),
    ],
)
def test_malformed_commands_raise_and_write_nothing(command: cmd.Command) -> None:
    """Bad input is a typed error, before any decision, and the log is unchanged."""
    engine = funded()
    count = len(engine.events)
    with pytest.raises(InvalidInput):
        engine.execute(command)
    assert count == len(engine.events)


def test_a_note_cannot_move_money() -> None:
    """Notes record audit information only; a money event disguised as a note is bad input."""
    engine = funded()
    rate = ev.RateSnapshot(100, 1_000_000, 0)
    forged = ev.BillingCharge("acct", "r", 10, 10, False, False, rate, "f")
    count = len(engine.events)
    with pytest.raises(InvalidInput):
        engine.execute(cmd.Note(forged))
    assert count == len(engine.events)


@pytest.mark.parametrize(
    "other",
    [
        {"paid_micro_usdc": 2_000},  # another payment
        {"reason": "another top-up"},
        {"paid_micro_usdc": None},
    ],
)
def test_every_field_of_a_credit_is_part_of_its_key(other: dict[str, object]) -> None:
    """A credit_id repeated with any other field (payment, reason) is 422; the same fields replay."""
    engine = MemoryEngine()
    first = cmd.Credit("acct", "topup", CreditKind.MINT, 1_000, reason="top-up", paid_micro_usdc=1_000)
    assert isinstance(engine.execute(first), cmd.CreditResult)
    replay = engine.execute(first)
    assert isinstance(replay, cmd.CreditResult)
    assert replay.replayed
    fields = {"reason": "top-up", "paid_micro_usdc": 1_000, **other}
    changed = cmd.Credit("acct", "topup", CreditKind.MINT, 1_000, **fields)  # type: ignore[arg-type]
    assert RefusalCode.IDEMPOTENCY_KEY_REUSED == refusal(engine.execute(changed))
    assert 1_000 == engine.state.account("acct").available_micro


def test_a_mint_credits_exactly_what_its_payment_converts_to() -> None:
    """SPEC §3: a mint paid in USDC converts at the rate; 5,000,000 µUSD against 1 µUSDC is refused, nothing written."""
    engine = MemoryEngine(Policy(usd_usdc_rate_ppm=1_000_000))
    result = engine.execute(cmd.Credit("acct", "m1", CreditKind.MINT, 5_000_000, paid_micro_usdc=1))
    assert isinstance(result, Refusal)
    assert (RefusalCode.INVALID_REQUEST, "amount_micro", 1, 0) == (
        result.code,
        result.details["field"],
        result.details["converted_micro"],
        len(engine.events),
    )
    ok = engine.execute(cmd.Credit("acct", "m2", CreditKind.MINT, 1, paid_micro_usdc=1))
    assert isinstance(ok, cmd.CreditResult)


def test_a_payment_belongs_to_a_mint_only() -> None:
    """paid_micro_usdc on a deduct or a credit note is refused."""
    engine = funded(5_000)
    result = engine.execute(cmd.Credit("acct", "d1", CreditKind.DEDUCT, 100, paid_micro_usdc=100))
    assert (RefusalCode.INVALID_REQUEST, "paid_micro_usdc") == (refusal(result), result.details["field"])  # type: ignore[union-attr]


def test_a_credit_record_from_an_older_snapshot_is_matched_on_what_it_kept() -> None:
    """A record whose fingerprint is the old event:amount replays the same amount and refuses another."""
    engine = MemoryEngine()
    engine.execute(cmd.Credit("acct", "old", CreditKind.MINT, 700))
    key = next(iter(engine.state.credits))
    engine.state.credits[key] = msgspec.structs.replace(engine.state.credits[key], fingerprint="credit_mint:700")
    again = engine.execute(cmd.Credit("acct", "old", CreditKind.MINT, 700))
    assert isinstance(again, cmd.CreditResult)
    assert again.replayed
    assert RefusalCode.IDEMPOTENCY_KEY_REUSED == refusal(engine.execute(cmd.Credit("acct", "old", CreditKind.MINT, 70)))
