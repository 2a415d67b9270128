"""The conservation guard (SPEC §9): pure transitions and checks, and the runner on a real engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from tollway import Engine, Settings
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core import guard as g
from tollway.core.commands import CreditKind, EntryResult, Refusal, RefusalCode
from tollway.core.decide import Write
from tollway.core.errors import InvalidInput
from tollway.core.guard import CheckResult, CheckStatus, Guard, GuardState
from tollway.core.ledger import Ledger
from tollway.core.money import INT64_MAX
from tollway.core.state import State
from tollway.guard import (
    AUDIT_GUARD_BYPASS,
    AUDIT_GUARD_RESET,
    BYPASS_ACTOR,
    CheckUnavailable,
    GuardRunner,
    redis_parity,
)
from tollway.redis.keys import Keys
from tollway.redis.projector import Projector
from tollway.redis.server import EmbeddedRedis
from tollway.testing import FakeClock, MemoryEngine
from tollway.wal.segments import iter_events

READY, DEGRADED, BYPASSED, UNINIT = GuardState.READY, GuardState.DEGRADED, GuardState.BYPASSED, GuardState.UNINITIALIZED
PASS = [CheckResult(name, CheckStatus.PASSED) for name in g.CHECK_NAMES]
VIOLATION = CheckResult(g.LEDGER_ZERO_SUM, CheckStatus.VIOLATED, ("sums to 1",))
TRANSIENT = CheckResult(g.PROJECTION_PARITY, CheckStatus.UNAVAILABLE, ("redis down",))


# -- pure: backoff --------------------------------------------------------------------------


def test_backoff_doubles_from_sixty_seconds_up_to_the_cap() -> None:
    """Without jitter the retry waits 60 s, 120 s, 240 s, 480 s, then 600 s (10× base) for ever."""
    assert [60_000, 120_000, 240_000, 480_000, 600_000, 600_000, 600_000] == [
        g.retry_delay_ms(attempts, 0) for attempts in (1, 2, 3, 4, 5, 6, 1000)
    ]


def test_jitter_extremes_are_twelve_and_a_half_percent() -> None:
    """Full negative and positive jitter move the first delay by exactly ±12.5 %."""
    assert (52_500, 67_500) == (g.retry_delay_ms(1, -1000), g.retry_delay_ms(1, 1000))


@given(st.integers(1, 64), st.integers(-1000, 1000))
def test_jittered_delay_stays_within_bounds(attempts: int, jitter: int) -> None:
    """Every delay is within ±12.5 % of its nominal value and never above the cap."""
    nominal = min(g.RETRY_BASE_MS * 2 ** (attempts - 1), g.RETRY_CAP_MS)
    delay = g.retry_delay_ms(attempts, jitter)
    assert True is (nominal * 875 // 1000 <= delay <= min(nominal * 1125 // 1000, g.RETRY_CAP_MS))


@pytest.mark.parametrize(("attempts", "jitter"), [(0, 0), (1, 1001), (1, -1001)])
def test_backoff_refuses_out_of_range_arguments(attempts: int, jitter: int) -> None:
    """Attempts start at 1 and the jitter is within ±1000 permille."""
    with pytest.raises(InvalidInput):
        g.retry_delay_ms(attempts, jitter)


# -- pure: transitions ----------------------------------------------------------------------


def test_passing_checks_make_the_guard_ready() -> None:
    """Checks that all pass take an uninitialized guard to ready, which allows holds."""
    guard = g.after_checks(Guard(), PASS, 0, 0)
    assert (READY, True) == (guard.state, g.holds_allowed(guard))


def test_a_violation_stops_recovery_without_a_retry() -> None:
    """A violated check degrades the guard with recovery stopped and no retry time."""
    guard = g.after_checks(Guard(READY), [*PASS, VIOLATION], 5, 0)
    assert (DEGRADED, True, None) == (guard.state, guard.recovery_stopped, guard.retry_at_ms)
    assert "ledger_zero_sum: sums to 1" == guard.reason
    assert False is g.holds_allowed(guard)


def test_a_transient_failure_schedules_backed_off_retries() -> None:
    """Consecutive runs that could not complete retry after 60 s, then 120 s (jitter applied)."""
    first = g.after_checks(Guard(), [TRANSIENT], 1_000, 0)
    second = g.after_checks(first, [TRANSIENT], 70_000, 1000)
    assert (DEGRADED, False, 1, 61_000) == (first.state, first.recovery_stopped, first.attempts, first.retry_at_ms)
    assert (2, 70_000 + 135_000) == (second.attempts, second.retry_at_ms)
    assert Guard(READY) == g.after_checks(second, PASS, 200_000, 0)


def test_recovery_stopped_is_cleared_only_by_reset() -> None:
    """After a violation, passing and transient runs leave it stopped; a reset starts afresh."""
    stopped = g.after_checks(Guard(), [VIOLATION], 0, 0)
    for later in (PASS, [TRANSIENT]):
        again = g.after_checks(stopped, later, 1, 0)
        assert (DEGRADED, True, stopped.reason) == (again.state, again.recovery_stopped, again.reason)
    assert Guard(UNINIT) == g.reset(stopped)
    assert READY == g.after_checks(g.reset(stopped), PASS, 2, 0).state


def test_bypass_allows_holds_and_survives_violations_and_reset() -> None:
    """Bypassed stays bypassed (holds allowed) whatever the checks find, and a reset keeps it."""
    bypassed = g.bypass(Guard(), "break-glass")
    found = g.after_checks(bypassed, [VIOLATION], 0, 0)
    assert (BYPASSED, True, True) == (found.state, found.recovery_stopped, g.holds_allowed(found))
    assert (BYPASSED, False) == (g.reset(found).state, g.reset(found).recovery_stopped)


def test_only_ready_and_bypassed_allow_holds() -> None:
    """Holds are allowed in exactly two of the four states."""
    allowed = {state for state in GuardState if g.holds_allowed(Guard(state))}
    assert {READY, BYPASSED} == allowed


def test_state_values_are_the_contract_strings() -> None:
    """The guard states and check names are spelled as the SPEC names them."""
    assert ["uninitialized", "ready", "degraded", "bypassed"] == [state.value for state in GuardState]
    assert (
        "budget_conservation",
        "cost_non_negative",
        "reserve_within_allocation",
        "micro_usd_format",
        "rate_consistency",
        "ledger_zero_sum",
        "projection_parity",
    ) == g.CHECK_NAMES


# -- pure: the checks -----------------------------------------------------------------------


def busy_memory_engine() -> MemoryEngine:
    """A log with a mint, holds, a commit with an overrun, a release and a direct charge."""
    mem = MemoryEngine()
    mem.execute(cmd.Credit("acct", "m1", CreditKind.MINT, 10_000))
    held = [mem.execute(cmd.Reserve("acct", f"r{i}", 1_000)) for i in range(3)]
    ids = [result.entry.billing_entry_id for result in held if isinstance(result, EntryResult)]
    mem.execute(cmd.Commit(ids[0], 1_500))
    mem.execute(cmd.Release(ids[1], "user_cancel"))
    mem.execute(cmd.Charge("acct", "fee-1", 200))
    return mem


def statuses(results: list[CheckResult]) -> dict[str, CheckStatus]:
    return {result.name: result.status for result in results}


def test_a_sound_state_passes_every_state_check() -> None:
    """A state folded from a real log passes all six state checks, with or without the WAL ledger."""
    mem = busy_memory_engine()
    for ledger in (None, mem.ledger()):
        results = g.run_checks(mem.state, ledger)
        assert list(g.STATE_CHECKS) == [result.name for result in results]
        assert dict.fromkeys(g.STATE_CHECKS, CheckStatus.PASSED) == statuses(results)


def violated(state: State, ledger: Ledger | None = None) -> set[str]:
    return {result.name for result in g.run_checks(state, ledger) if result.status is CheckStatus.VIOLATED}


def test_held_balance_off_its_entries_breaks_allocation_and_conservation() -> None:
    """A held balance that is not the sum of held estimates breaks reserve_within_allocation."""
    mem = busy_memory_engine()
    mem.state.accounts["acct"].held_micro += 1
    mem.state.accounts["acct"].available_micro -= 1
    assert {g.BUDGET_CONSERVATION, g.RESERVE_WITHIN_ALLOCATION} == violated(mem.state)


def test_negative_entry_amount_breaks_cost_and_format_checks() -> None:
    """A negative charged amount on an entry is neither a non-negative cost nor a MicroUSD."""
    mem = busy_memory_engine()
    entry_id, entry = next(iter(mem.state.entries.items()))
    mem.state.entries[entry_id] = msgspec.structs.replace(entry, uncollected_micro=-5)
    assert {g.COST_NON_NEGATIVE, g.MICRO_USD_FORMAT} == violated(mem.state)


def test_amount_beyond_int64_breaks_micro_usd_format() -> None:
    """An amount Redis could not hold breaks micro_usd_format."""
    mem = busy_memory_engine()
    entry_id, entry = next(iter(mem.state.entries.items()))
    mem.state.entries[entry_id] = msgspec.structs.replace(entry, uncollected_micro=INT64_MAX + 1)
    assert {g.MICRO_USD_FORMAT} == violated(mem.state)


def test_insane_rate_snapshot_breaks_rate_consistency() -> None:
    """A zero credit-unit rate, or one frozen after its entry was created, breaks rate_consistency."""
    mem = busy_memory_engine()
    mem.execute(cmd.Reserve("acct", "r9", 100))  # two live holds: settled entries are records only
    ids = list(mem.state.entries)
    first, second = mem.state.entries[ids[0]], mem.state.entries[ids[1]]
    mem.state.entries[ids[0]] = msgspec.structs.replace(first, rate=ev.RateSnapshot(0, 1_000_000, 0))
    late = ev.RateSnapshot(100, 1_000_000, second.created_at_ms + 1)
    mem.state.entries[ids[1]] = msgspec.structs.replace(second, rate=late)
    results = {result.name: result for result in g.run_checks(mem.state)}
    assert {g.RATE_CONSISTENCY} == violated(mem.state)
    assert 2 == len(results[g.RATE_CONSISTENCY].problems)


def test_money_from_nowhere_breaks_zero_sum() -> None:
    """Revenue that no account paid makes the ledger sum non-zero."""
    mem = busy_memory_engine()
    mem.state.revenue_micro += 7
    assert {g.BUDGET_CONSERVATION, g.LEDGER_ZERO_SUM} == violated(mem.state)


def test_state_that_disagrees_with_the_wal_ledger_breaks_conservation() -> None:
    """A state whose balances differ from the independent WAL fold breaks budget_conservation only."""
    mem = busy_memory_engine()
    ledger = mem.ledger()
    mem.state.accounts["acct"].available_micro += 3
    mem.state.funding_micro -= 3  # still sums to zero, still non-negative: only the fold can tell
    assert set() == violated(mem.state)
    assert {g.BUDGET_CONSERVATION} == violated(mem.state, ledger)


def test_problems_per_check_are_capped() -> None:
    """A check keeps at most PROBLEMS_PER_CHECK_MAX problems; the last says how many more."""
    found = g.result("x", [f"p{i}" for i in range(50)])
    assert g.PROBLEMS_PER_CHECK_MAX == len(found.problems)
    assert "... and 31 more" == found.problems[-1]


def test_commit_with_a_different_rate_than_its_hold_is_caught() -> None:
    """A commit event whose rate snapshot differs from its reserve's breaks rate_consistency."""
    mem = busy_memory_engine()
    commit = next(e for e in mem.events if isinstance(e.payload, ev.BillingCommit))
    read = mem.read_entry(commit.billing_entry_id)  # settled: the guard gets it from the commit's transition
    assert read is not None
    assert [] == g.check_event(commit, mem.state, read[0])
    forged_payload = msgspec.structs.replace(commit.payload, rate=ev.RateSnapshot(101, 1_000_000, 0))
    forged = msgspec.structs.replace(commit, payload=forged_payload)
    assert [g.RATE_CONSISTENCY] == [result.name for result in g.check_event(forged, mem.state, read[0])]


def test_event_with_a_negative_amount_is_caught() -> None:
    """An event carrying a negative amount breaks cost_non_negative."""
    event = ev.Event(1, 0, "01J0000000000000000000000A", "untraced", ev.CreditMint("acct", "m", -1))
    assert [g.COST_NON_NEGATIVE] == [result.name for result in g.check_event(event, State())]


# -- the runner on a real engine ------------------------------------------------------------


class Gate:
    """An injected sleep that records each delay and waits until the test lets it go."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.release = asyncio.Event()

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        await self.release.wait()
        self.release.clear()


class Parity:
    """A scripted parity check: problems to return, or a transient error to raise."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.unreachable = False
        self.calls = 0

    async def __call__(self) -> list[str]:
        self.calls += 1
        if self.unreachable:
            raise CheckUnavailable("redis unreachable")
        return list(self.problems)


async def funded_holds(engine: Engine, count: int) -> list[str]:
    await engine.execute(cmd.Credit("acct", "m1", CreditKind.MINT, 1_000_000))
    results = [await engine.execute(cmd.Reserve("acct", f"pre{i}", 1_000)) for i in range(count)]
    return [result.entry.billing_entry_id for result in results if isinstance(result, EntryResult)]


async def until(condition: Callable[[], bool]) -> None:
    """Let the runner's tasks (and their worker threads) run until ``condition`` holds (at most 2 s)."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)


def audits(engine: Engine) -> list[ev.Audit]:
    return [e.payload for e in iter_events(engine.settings.wal_dir) if isinstance(e.payload, ev.Audit)]


@pytest.fixture
def parity() -> Parity:
    """A parity check that passes until told otherwise."""
    return Parity()


@pytest.fixture
async def runner_factory(engine: Engine, parity: Parity) -> AsyncIterator[list[GuardRunner]]:
    """Runners made by a test are closed after it."""
    made: list[GuardRunner] = []
    yield made
    for runner in made:
        await runner.close()


def make_runner(made: list[GuardRunner], engine: Engine, parity: Parity, **options: object) -> GuardRunner:
    runner = GuardRunner(engine, parity=parity, jitter=lambda: 0, **options)  # type: ignore[arg-type]
    made.append(runner)
    return runner


async def test_sound_engine_becomes_ready_and_takes_holds(
    engine: Engine, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """Startup checks on a sound engine (with the WAL ledger fold) pass and holds are taken."""
    await funded_holds(engine, 2)
    runner = make_runner(runner_factory, engine, parity, verify_wal_ledger=True)
    assert READY == (await runner.start()).state
    assert isinstance(await engine.execute(cmd.Reserve("acct", "after", 1_000)), EntryResult)
    assert dict.fromkeys(g.CHECK_NAMES, "passed") == {c.name: c.status.value for c in runner.status().checks}


async def test_degraded_guard_refuses_holds_but_not_commits_or_releases(
    engine: Engine, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """While degraded, reserves and charges get BILLING_EVALUATOR_UNAVAILABLE; commit and release work."""
    first, second = await funded_holds(engine, 2)
    parity.problems = ["acct: available differs"]
    runner = make_runner(runner_factory, engine, parity)
    guard = await runner.start()
    assert (DEGRADED, True) == (guard.state, guard.recovery_stopped)
    for command in (cmd.Reserve("acct", "new", 1_000), cmd.Charge("acct", "fee", 10)):
        refusal = await engine.execute(command)
        assert isinstance(refusal, Refusal)
        assert (RefusalCode.GUARD_UNAVAILABLE, 30) == (refusal.code, refusal.details["retry_after_seconds"])
    assert "BILLING_EVALUATOR_UNAVAILABLE" == RefusalCode.GUARD_UNAVAILABLE.value
    assert isinstance(await engine.execute(cmd.Commit(first, 900)), EntryResult)
    assert isinstance(await engine.execute(cmd.Release(second, "user_cancel")), EntryResult)


async def test_transient_failure_retries_after_backoff_then_becomes_ready(
    engine: Engine, clock: FakeClock, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """Unreachable parity degrades with a retry 60 s later; when it answers, the guard is ready."""
    parity.unreachable = True
    gate = Gate()
    runner = make_runner(runner_factory, engine, parity, sleep=gate)
    guard = await runner.start()
    assert (DEGRADED, False, 1, clock.now + 60_000) == (
        guard.state,
        guard.recovery_stopped,
        guard.attempts,
        guard.retry_at_ms,
    )
    await until(lambda: bool(gate.delays))
    assert [60.0] == gate.delays
    assert isinstance(await engine.execute(cmd.Reserve("acct", "r", 0)), Refusal)
    parity.unreachable = False
    clock.advance(60_000)
    gate.release.set()
    await until(lambda: runner.guard.state is READY)
    assert (READY, 2) == (runner.guard.state, parity.calls)
    assert isinstance(await engine.execute(cmd.Reserve("acct", "r", 0)), EntryResult)


async def test_second_transient_failure_waits_twice_as_long(
    engine: Engine, clock: FakeClock, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """A retry that still cannot run schedules the next one 120 s later."""
    parity.unreachable = True
    gate = Gate()
    runner = make_runner(runner_factory, engine, parity, sleep=gate)
    await runner.start()
    await until(lambda: len(gate.delays) == 1)
    clock.advance(60_000)
    gate.release.set()
    await until(lambda: len(gate.delays) == 2)
    assert ([60.0, 120.0], 2) == (gate.delays, runner.guard.attempts)


async def test_violation_is_cleared_only_by_an_audited_reset(
    engine: Engine, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """A later passing check leaves recovery stopped; reset writes guard_reset to the WAL and re-checks."""
    parity.problems = ["entry differs"]
    runner = make_runner(runner_factory, engine, parity)
    await runner.start()
    parity.problems = []
    assert (DEGRADED, True) == ((await runner.check()).state, runner.guard.recovery_stopped)
    guard = await runner.reset("admin-7")
    assert (READY, False) == (guard.state, guard.recovery_stopped)
    [audit] = audits(engine)
    assert (AUDIT_GUARD_RESET, "admin-7") == (audit.action, audit.actor)


async def test_reset_needs_an_admin_id(engine: Engine, parity: Parity, runner_factory: list[GuardRunner]) -> None:
    """A reset without an admin id is refused and writes nothing."""
    runner = make_runner(runner_factory, engine, parity)
    await runner.start()
    with pytest.raises(InvalidInput):
        await runner.reset(" ")
    assert [] == audits(engine)


async def test_bypass_writes_an_audit_event_and_logs_critical(
    engine: Engine, parity: Parity, runner_factory: list[GuardRunner], caplog: pytest.LogCaptureFixture
) -> None:
    """Break-glass bypass: an audit event in the WAL, a CRITICAL line, and holds allowed despite violations."""
    parity.problems = ["everything differs"]
    runner = make_runner(runner_factory, engine, parity, bypass=True)
    with caplog.at_level(logging.CRITICAL, logger="tollway.guard"):
        guard = await runner.start()
    assert (BYPASSED, True) == (guard.state, guard.recovery_stopped)
    [audit] = audits(engine)
    assert (AUDIT_GUARD_BYPASS, BYPASS_ACTOR) == (audit.action, audit.actor)
    assert ["CRITICAL"] == [r.levelname for r in caplog.records if "BYPASSED" in r.getMessage()]
    await engine.execute(cmd.Credit("acct", "m1", CreditKind.MINT, 5_000))
    assert isinstance(await engine.execute(cmd.Reserve("acct", "r", 1_000)), EntryResult)


async def test_normal_traffic_never_trips_the_per_event_watch(
    engine: Engine, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """Reserves, commits with overruns, releases and charges keep a watching guard ready."""
    runner = make_runner(runner_factory, engine, parity)
    await runner.start()
    first, second = await funded_holds(engine, 2)
    await engine.execute(cmd.Commit(first, 5_000))
    await engine.execute(cmd.Release(second, "pre_stream_failure"))
    await engine.execute(cmd.Charge("acct", "fee", 10))
    assert READY == runner.guard.state


async def test_a_commit_at_another_rate_stops_holds_as_it_lands(
    engine: Engine, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """A durable commit whose rate differs from its hold's (written around decide) degrades the guard at once."""
    runner = make_runner(runner_factory, engine, parity)
    await runner.start()
    [hold] = await funded_holds(engine, 1)
    entry = engine.state.entries[hold]
    forged_rate = ev.RateSnapshot(entry.rate.credit_units_per_usd + 1, entry.rate.usd_usdc_rate_ppm, 0)
    commit = ev.BillingCommit("acct", 1_000, 900, 900, 0, "debit_available", False, forged_rate)
    with pytest.raises(InvalidInput):  # no public command can write it ...
        await engine.execute(cmd.Note(commit, billing_entry_id=hold))
    note = cmd.Note(ev.Audit("forge", "test", ""), billing_entry_id=hold)
    batch, _ = engine._write(Write(hold, (commit,), "forged"), note, engine.now_ms())  # ... so go around decide
    await engine.wait_durable(batch.last_seq)
    assert (DEGRADED, True) == (runner.guard.state, runner.guard.recovery_stopped)
    assert (runner.guard.reason or "").startswith("rate_consistency: ")
    assert isinstance(await engine.execute(cmd.Reserve("acct", "after", 1)), Refusal)


async def test_status_reports_state_checks_and_retry(
    engine: Engine, clock: FakeClock, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """The status mapping carries the state, recovery flag, reason, retry time and each check."""
    parity.unreachable = True
    runner = make_runner(runner_factory, engine, parity, sleep=Gate())
    await runner.start()
    status = runner.status().to_dict()
    assert ("degraded", False, False, clock.now + 60_000, 30) == (
        status["state"],
        status["holds_allowed"],
        status["recovery_stopped"],
        status["retry_at_ms"],
        status["retry_after_seconds"],
    )
    checks = {check["name"]: check["status"] for check in status["checks"]}  # type: ignore[attr-defined]
    assert "unavailable" == checks["projection_parity"]
    assert "projection_parity: could not run: redis unreachable" == status["reason"]


async def test_metrics_hook_sees_every_new_record(
    engine: Engine, parity: Parity, runner_factory: list[GuardRunner]
) -> None:
    """``on_checked`` is told the closed gate at start and the ready record after the checks."""
    seen: list[GuardState] = []
    runner = make_runner(runner_factory, engine, parity, on_checked=lambda guard, _results: seen.append(guard.state))
    await runner.start()
    assert [UNINIT, READY] == seen


# -- projection parity against a real Redis ---------------------------------------------------


async def test_redis_parity_passes_then_catches_a_tampered_balance(
    settings: Settings, clock: FakeClock, redis_server: EmbeddedRedis
) -> None:
    """A caught-up projection passes; a balance changed behind the projector's back is a violation."""
    keys = Keys("tw", "guard")
    client = aioredis.Redis.from_url(redis_server.url)
    async with Engine.open(settings=settings, clock=clock) as engine:
        projector = Projector(engine, client, keys)
        projecting = asyncio.create_task(projector.run())
        await funded_holds(engine, 2)
        runner = GuardRunner(engine, parity=redis_parity(engine, projector), jitter=lambda: 0)
        assert READY == (await runner.start()).state
        await client.hset(keys.account("acct"), "available", "1")
        guard = await runner.reset("admin")  # its audit event moves the projection on: the check waits for it
        assert (DEGRADED, True) == (guard.state, guard.recovery_stopped)
        assert "projection_parity" in (guard.reason or "")
        await runner.close()
        projecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await projecting
    await client.aclose()


async def test_redis_parity_is_transient_when_redis_is_gone(
    settings: Settings, clock: FakeClock, redis_server: EmbeddedRedis
) -> None:
    """With Redis stopped the parity check cannot run: degraded with a retry, not recovery_stopped."""
    client = aioredis.Redis.from_url(redis_server.url)
    async with Engine.open(settings=settings, clock=clock) as engine:
        projector = Projector(engine, client, Keys("tw", "gone"))
        await redis_server.stop()
        runner = GuardRunner(engine, parity=redis_parity(engine, projector), jitter=lambda: 0, sleep=Gate())
        guard = await runner.start()
        assert (DEGRADED, False, clock.now + 60_000) == (guard.state, guard.recovery_stopped, guard.retry_at_ms)
        await runner.close()
    await client.aclose()
