"""``tollway demo``: simulated gateway traffic through a real engine, then an audit.

The demo runs a list of :data:`PHASES` on one engine over a fresh data directory:

- ``mint`` — prepaid credit for every account (a few are kept poor so they run dry);
- ``traffic`` — many concurrent asyncio "gateways", each looping over weighted scenarios:
  reserve → simulated inference → commit (mostly under the estimate, some overruns), a failed
  stream released as ``pre_stream_failure``, a hold abandoned so that the expiry sweeper
  returns it, a late commit refused as ``reservation_expired``, idempotent retries (a second
  reserve while held gets ``request_in_progress``, a repeated commit is replayed), direct
  charges, admin voids, top-ups and oversized requests refused for ``insufficient_funds``;
- ``drain`` — waits for the abandoned holds to expire and sweeps them, so no hold is left.

Inference is simulated by yielding to the event loop a few times, never by sleeping, so the
numbers measure the engine (decide, apply, group commit, fsync), not a timer. After the engine
closes, :func:`tollway.audit.audit` re-reads the files and gives the conservation verdict;
:func:`run_demo` returns everything as a :class:`DemoResult` (the CLI prints it).

Later phases (the HTTP service, the Redis projection, a settlement outage and its recovery)
are added by appending to :data:`PHASES`. This module reads no environment: the CLI hands it
:class:`~tollway.config.Settings` and :class:`DemoOptions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from tollway.audit import AuditReport, audit
from tollway.config import Durability, Settings
from tollway.core import commands as cmd
from tollway.core.events import BillingReserveExpired, Event
from tollway.core.observer import NoopObserver
from tollway.core.state import Entry, Transition
from tollway.engine import Engine

RICH_MINT_MICRO: Final = 10_000_000  # $10 for most accounts
POOR_MINT_MICRO: Final = 200_000  # $0.20 for every tenth account: it runs dry and gets refusals
TOP_UP_MICRO: Final = 1_000_000
ESTIMATE_MICRO_MIN: Final = 1_000
ESTIMATE_MICRO_MAX: Final = 40_000
ABANDON_TTL_S: Final = 1  # the shortest hold the engine accepts: abandoned holds expire quickly
DRAIN_WAIT_S_MAX: Final = 5.0
PROGRESS_TICK_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """How much traffic to drive. With ``operations`` set, ``seconds`` is ignored."""

    accounts: int = 50
    seconds: float = 12.0
    operations: int | None = None
    seed: int = 1
    gateways: int = 64  # concurrent gateway tasks


@dataclass
class Tally:
    """What the gateways saw, counted as they went (owned by the event loop)."""

    operations: int = 0
    holds: int = 0
    committed: int = 0
    overruns: int = 0
    released: int = 0
    abandoned: int = 0
    charged: int = 0
    voided: int = 0
    replays: int = 0
    minted_micro: int = 0
    refusals: Counter[str] = field(default_factory=Counter)


class _Observer(NoopObserver):
    """Counts group-commit batches and sweeper expiries, as the engine reports them."""

    def __init__(self) -> None:
        self.batches = 0
        self.records = 0
        self.expired = 0

    def wal_batch(self, records: int, size_bytes: int, sync_seconds: float) -> None:  # noqa: ARG002 - the Observer protocol
        """Count one durable batch of ``records`` records."""
        self.batches += 1
        self.records += records

    def transition(self, event: Event, change: Transition) -> None:  # noqa: ARG002 - the Observer protocol
        """Count holds the sweeper expired."""
        if isinstance(event.payload, BillingReserveExpired):
            self.expired += 1


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    """How long a phase took and how many WAL events it wrote."""

    name: str
    seconds: float
    events: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Everything the demo measured, and the audit of what it left on disk."""

    data_dir: Path
    durability: Durability
    options: DemoOptions
    tally: Tally
    phases: tuple[PhaseTiming, ...]
    expired: int
    wal_batches: int
    wal_records: int
    audit: AuditReport

    @property
    def ok(self) -> bool:
        """The conservation verdict is clean."""
        return self.audit.ok

    @property
    def traffic(self) -> PhaseTiming:
        """The timing of the traffic phase."""
        return next(phase for phase in self.phases if phase.name == "traffic")


class _Budget:
    """When the gateways stop: after ``operations`` operations, or at a deadline."""

    def __init__(self, options: DemoOptions, first_seq: int) -> None:
        self.operations = options.operations
        self.seconds = options.seconds
        self.started = time.monotonic()
        self.first_seq = first_seq  # the WAL sequence when the traffic started, for events/s
        self.taken = 0

    def take(self) -> bool:
        """Claim one more operation, if the budget allows it."""
        if self.operations is not None:
            if self.taken >= self.operations:
                return False
        elif time.monotonic() - self.started >= self.seconds:
            return False
        self.taken += 1
        return True

    @property
    def total(self) -> float:
        """The size of the progress bar: operations, or seconds."""
        return float(self.operations) if self.operations is not None else self.seconds

    @property
    def done(self) -> float:
        """How far along the progress bar is."""
        return float(self.taken) if self.operations is not None else time.monotonic() - self.started


@dataclass
class Demo:
    """What every phase and scenario works with."""

    engine: Engine
    options: DemoOptions
    console: Console
    accounts: list[str]
    tally: Tally = field(default_factory=Tally)
    committed: deque[str] = field(default_factory=lambda: deque(maxlen=1000))  # entries a void may pick
    late: list[Entry] = field(default_factory=list)  # holds whose commit comes after their expiry
    _ids: int = field(default=0, init=False)

    def new_id(self, prefix: str) -> str:
        """A request or credit id no one used before."""
        self._ids += 1
        return f"{prefix}-{self._ids}"

    async def run(self, command: cmd.Command) -> cmd.Outcome:
        """Execute ``command``; count a refusal by its code."""
        outcome = await self.engine.execute(command)
        if isinstance(outcome, cmd.Refusal):
            self.tally.refusals[outcome.code.value] += 1
        elif isinstance(outcome, cmd.EntryResult | cmd.CreditResult) and outcome.replayed:
            self.tally.replays += 1
        return outcome

    async def reserve(self, account_id: str, estimate_micro: int, ttl_s: int | None = None) -> Entry | None:
        """Take a hold; None when refused."""
        outcome = await self.run(cmd.Reserve(account_id, self.new_id("req"), estimate_micro, ttl_s))
        if isinstance(outcome, cmd.EntryResult):
            self.tally.holds += 1
            return outcome.entry
        return None

    async def commit(self, entry: Entry, actual_micro: int) -> cmd.Outcome:
        """Commit ``actual_micro`` against a hold and remember the entry for a later void."""
        outcome = await self.run(cmd.Commit(entry.billing_entry_id, actual_micro))
        if isinstance(outcome, cmd.EntryResult) and not outcome.replayed:
            self.tally.committed += 1
            self.tally.overruns += actual_micro > entry.estimated_cost_micro
            self.committed.append(entry.billing_entry_id)
        return outcome


# -- scenarios: one simulated gateway request each ------------------------------------------


async def _inference(rng: random.Random) -> None:
    """A model call: yield to the other gateways a few times (no timer, no real sleep)."""
    for _ in range(rng.randint(0, 3)):
        await asyncio.sleep(0)


def _estimate(rng: random.Random) -> int:
    return rng.randint(ESTIMATE_MICRO_MIN, ESTIMATE_MICRO_MAX)


def _actual(rng: random.Random, estimate_micro: int) -> int:
    """Mostly under the estimate; one call in ten overruns it by up to half."""
    if rng.random() < 0.1:
        return estimate_micro + rng.randint(1, estimate_micro // 2)
    return rng.randint(estimate_micro * 3 // 10, estimate_micro)


async def _normal(demo: Demo, rng: random.Random) -> None:
    entry = await demo.reserve(rng.choice(demo.accounts), _estimate(rng))
    if entry is not None:
        await _inference(rng)
        await demo.commit(entry, _actual(rng, entry.estimated_cost_micro))


async def _failed_stream(demo: Demo, rng: random.Random) -> None:
    entry = await demo.reserve(rng.choice(demo.accounts), _estimate(rng))
    if entry is not None:
        await _inference(rng)
        if isinstance(await demo.run(cmd.Release(entry.billing_entry_id, "pre_stream_failure")), cmd.EntryResult):
            demo.tally.released += 1


async def _abandoned(demo: Demo, rng: random.Random) -> None:
    """The gateway crashed mid-stream: nobody commits; the sweeper returns the hold."""
    if await demo.reserve(rng.choice(demo.accounts), _estimate(rng), ttl_s=ABANDON_TTL_S) is not None:
        demo.tally.abandoned += 1


async def _late_commit(demo: Demo, rng: random.Random) -> None:
    """A stream that will outlive its hold: the ``drain`` phase tries to commit it after expiry."""
    entry = await demo.reserve(rng.choice(demo.accounts), _estimate(rng), ttl_s=ABANDON_TTL_S)
    if entry is not None:
        demo.tally.abandoned += 1
        demo.late.append(entry)


async def _retried(demo: Demo, rng: random.Random) -> None:
    """A gateway retries with the same request_id: no second hold, no second charge."""
    account_id, request_id, estimate = rng.choice(demo.accounts), demo.new_id("req"), _estimate(rng)
    first = await demo.run(cmd.Reserve(account_id, request_id, estimate))
    if not isinstance(first, cmd.EntryResult):
        return
    demo.tally.holds += 1
    await demo.run(cmd.Reserve(account_id, request_id, estimate))  # still held: request_in_progress
    await _inference(rng)
    actual = _actual(rng, estimate)
    await demo.commit(first.entry, actual)
    await demo.commit(first.entry, actual)  # replayed
    await demo.run(cmd.Reserve(account_id, request_id, estimate))  # after commit: replayed


async def _direct_charge(demo: Demo, rng: random.Random) -> None:
    charge = cmd.Charge(rng.choice(demo.accounts), demo.new_id("fee"), _estimate(rng), allow_partial=rng.random() < 0.3)
    if isinstance(await demo.run(charge), cmd.EntryResult):
        demo.tally.charged += 1


async def _void(demo: Demo, rng: random.Random) -> None:
    if not demo.committed:
        await _normal(demo, rng)
        return
    entry_id = demo.committed.popleft()
    if isinstance(await demo.run(cmd.Void(entry_id, "demo: goodwill refund", "demo-admin")), cmd.EntryResult):
        demo.tally.voided += 1


async def _top_up(demo: Demo, rng: random.Random) -> None:
    credit = cmd.Credit(rng.choice(demo.accounts), demo.new_id("topup"), cmd.CreditKind.MINT, TOP_UP_MICRO)
    if isinstance(await demo.run(credit), cmd.CreditResult):
        demo.tally.minted_micro += TOP_UP_MICRO


async def _oversized(demo: Demo, rng: random.Random) -> None:
    """A request bigger than any balance: refused with ``insufficient_funds``, nothing written."""
    await demo.reserve(rng.choice(demo.accounts), RICH_MINT_MICRO * 50)


Scenario = Callable[[Demo, random.Random], Awaitable[None]]
SCENARIOS: Final[tuple[tuple[Scenario, int], ...]] = (
    (_normal, 780),
    (_failed_stream, 60),
    (_abandoned, 30),
    (_late_commit, 2),
    (_retried, 40),
    (_direct_charge, 40),
    (_void, 15),
    (_top_up, 15),
    (_oversized, 18),
)
"""Each scenario with its weight (per mille of operations)."""


async def _gateway(demo: Demo, budget: _Budget, index: int) -> None:
    rng = random.Random(demo.options.seed * 1_000_003 + index)
    scenarios, weights = zip(*SCENARIOS, strict=True)
    while budget.take():
        await rng.choices(scenarios, weights)[0](demo, rng)
        demo.tally.operations += 1


# -- phases --------------------------------------------------------------------------------


async def _mint(demo: Demo) -> None:
    for index, account_id in enumerate(demo.accounts):
        amount = POOR_MINT_MICRO if index % 10 == 9 else RICH_MINT_MICRO
        await demo.run(cmd.Credit(account_id, "initial", cmd.CreditKind.MINT, amount, reason="demo credit"))
        demo.tally.minted_micro += amount


async def _traffic(demo: Demo) -> None:
    budget = _Budget(demo.options, demo.engine.state.last_sequence)
    sweeper = asyncio.create_task(demo.engine.run_sweeper())
    try:
        async with _progress(demo, budget):
            await asyncio.gather(*(_gateway(demo, budget, i) for i in range(demo.options.gateways)))
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper


async def _drain(demo: Demo) -> None:
    """Sweep until no hold is left, then try the late commits: each is refused, never charged.

    Abandoned holds expire within ``ABANDON_TTL_S`` of the end of the traffic.
    """
    deadline = time.monotonic() + DRAIN_WAIT_S_MAX
    with demo.console.status("Waiting for the abandoned holds to expire…"):
        while demo.engine.state.held_count and time.monotonic() < deadline:
            if not await demo.engine.sweep_once():
                await asyncio.sleep(0.05)
    rng = random.Random(demo.options.seed)
    await asyncio.gather(*(demo.commit(entry, _actual(rng, entry.estimated_cost_micro)) for entry in demo.late))


Phase = Callable[[Demo], Awaitable[None]]
PHASES: Final[tuple[tuple[str, Phase], ...]] = (("mint", _mint), ("traffic", _traffic), ("drain", _drain))


@contextlib.asynccontextmanager
async def _progress(demo: Demo, budget: _Budget) -> AsyncIterator[None]:
    """A live progress line, refreshed every ``PROGRESS_TICK_S`` by a task of its own."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16), TimeElapsedColumn())
    with Progress(*columns, console=demo.console) as progress:
        task = progress.add_task("traffic", total=budget.total)
        ticker = asyncio.create_task(_tick(demo, budget, progress, task))
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            _describe(demo, budget, progress, task)


async def _tick(demo: Demo, budget: _Budget, progress: Progress, task: TaskID) -> None:
    while True:
        _describe(demo, budget, progress, task)
        await asyncio.sleep(PROGRESS_TICK_S)


def _describe(demo: Demo, budget: _Budget, progress: Progress, task: TaskID) -> None:
    events = demo.engine.state.last_sequence - budget.first_seq
    elapsed_s = time.monotonic() - budget.started
    rate = int(events / elapsed_s) if elapsed_s > 0 else 0
    refusals = sum(demo.tally.refusals.values())
    description = f"{demo.tally.operations:>8,} ops {refusals:>6,} refused {events:>8,} events {rate:>7,}/s"
    progress.update(task, completed=min(budget.done, budget.total), description=description)


# -- running and reporting -----------------------------------------------------------------


async def run_demo(settings: Settings, options: DemoOptions, console: Console) -> DemoResult:
    """Run every phase on an engine over ``settings.data_dir``, close it, and audit the files."""
    observer = _Observer()
    tally, timings = await _drive(settings, options, console, observer)
    with console.status("Auditing the files: two independent folds of the WAL, and the snapshot…"):
        report = await asyncio.to_thread(audit, settings.data_dir)
    return DemoResult(
        settings.data_dir,
        settings.durability,
        options,
        tally,
        timings,
        observer.expired,
        observer.batches,
        observer.records,
        report,
    )


async def _drive(
    settings: Settings, options: DemoOptions, console: Console, observer: _Observer
) -> tuple[Tally, tuple[PhaseTiming, ...]]:
    """The phases, on an engine that is closed (and its state let go) before the audit reads the files."""
    accounts = [f"acct-{index:03d}" for index in range(options.accounts)]
    timings: list[PhaseTiming] = []
    async with Engine.open(settings=settings, observer=observer) as engine:
        demo = Demo(engine, options, console, accounts)
        for name, phase in PHASES:
            first_seq, started = engine.state.last_sequence, time.perf_counter()
            await phase(demo)  # every command was answered, so everything it wrote is durable
            timings.append(PhaseTiming(name, time.perf_counter() - started, engine.state.last_sequence - first_seq))
    return demo.tally, tuple(timings)
