"""``tollway demo``: the whole billing loop on a fresh machine, with a settlement outage.

Everything runs embedded in one process (:mod:`tollway.demo.stack`): the engine with its
fsynced WAL, a private ``redis-server`` holding the projection and the finalize queue, the
finalize worker, the expiry sweeper, the conservation guard, the HTTP API, and a settlement
simulator. Simulated gateways (:mod:`tollway.demo.traffic`) — most embedding the library, some
calling the HTTP API — drive traffic through these phases, shown live:

- ``mint`` — prepaid credit for every account;
- ``traffic`` — reserve/commit/release/charge traffic; commits are finalized with settlement;
- ``outage`` — the simulator answers 503: the breaker opens, billing goes on, charges queue up;
- ``recovery`` — settlement is back: one probe closes the breaker and the queue drains;
- ``drain`` — gateways stop; the demo waits until every charge is finalized and every hold is
  back, then tries the late commits (refused: their holds expired);
- ``audit`` — two independent folds of the WAL, the snapshot, the Redis projection and the
  simulator's finalized list must all agree.

:func:`run_demo` returns a :class:`DemoResult`; the CLI prints it. This module reads no
environment: the CLI hands it :class:`~tollway.config.Settings` and :class:`DemoOptions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
from rich.console import Console

from tollway.audit import AuditReport, audit
from tollway.audit_live import redis_section, settlement_section
from tollway.config import Durability, Settings
from tollway.core.breaker import BreakerState
from tollway.core.events import BillingReserveExpired
from tollway.demo.dashboard import Dashboard, Snapshot
from tollway.demo.stack import Stack, demo_stack
from tollway.demo.traffic import Budget, Demo, Tally, gateway, late_commits, mint
from tollway.wal.segments import iter_events

DRAIN_WAIT_S_MAX: Final = 30.0
TICK_S: Final = 0.2
STARTING: Final = "Starting the engine (WAL), a private redis-server, the settlement simulator and the HTTP API…"
SHARES: Final = {"traffic": 0.4, "outage": 0.25, "recovery": 0.35}
"""How the traffic time is split between the three traffic phases."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """How much traffic to drive: ``seconds`` of it, capped at ``operations`` when given."""

    accounts: int = 50
    seconds: float = 20.0
    operations: int | None = None
    seed: int = 1
    gateways: int = 64  # concurrent gateway tasks
    rate_ops_s: int | None = 1500  # pace of all gateways together; None: as fast as they can


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    """How long a phase took and how many WAL events it wrote."""

    name: str
    seconds: float
    events: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the settlement side saw."""

    finalized: int
    calls_by_status: dict[int, int]
    breaker_opened: bool  # during the outage
    pending_at_outage_end: int  # charges queued when settlement came back


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Everything the demo measured, and the audit of what it left behind."""

    data_dir: Path
    durability: Durability
    options: DemoOptions
    tally: Tally
    phases: tuple[PhaseTiming, ...]
    expired: int
    wal_batches: int
    wal_records: int
    settlement: Settlement
    audit: AuditReport

    @property
    def ok(self) -> bool:
        """The conservation verdict is clean (files, projection and settlement)."""
        return self.audit.ok

    @property
    def traffic_seconds(self) -> float:
        """Time spent in the three traffic phases."""
        return sum(p.seconds for p in self.phases if p.name in SHARES)


@dataclass
class _Run:
    """The demo while it runs."""

    stack: Stack
    demo: Demo
    options: DemoOptions
    dashboard: Dashboard
    budget: Budget
    timings: list[PhaseTiming] = field(default_factory=list)
    breaker_opened: bool = False
    pending_at_outage_end: int = 0
    finalized: int = 0  # as the simulator last reported it
    phase_end_sequence: int | None = None

    async def phase(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run one phase; its events are those since the previous phase ended.

        The gateways keep running between phases (while the simulator's faults are switched),
        so counting from this phase's own start would lose those events from every phase.
        """
        engine = self.stack.service.engine
        started = time.perf_counter()
        first = engine.state.last_sequence if self.phase_end_sequence is None else self.phase_end_sequence
        self.dashboard.phase = name
        await body()
        await engine.wait_durable(engine.state.last_sequence)
        self.phase_end_sequence = engine.state.last_sequence
        self.timings.append(PhaseTiming(name, time.perf_counter() - started, self.phase_end_sequence - first))

    async def poll_simulator(self) -> None:
        """Keep the simulator's finalized count fresh for the dashboard."""
        while True:
            with contextlib.suppress(httpx.HTTPError):
                self.finalized = int((await self.stack.simulator.stats())["finalized"])
            await asyncio.sleep(TICK_S * 2)

    def snapshot(self) -> Snapshot:
        service = self.stack.service
        state = service.engine.state
        breaker = service.worker.breaker_state() if service.worker else BreakerState.CLOSED
        self.breaker_opened |= breaker is BreakerState.OPEN
        return Snapshot(
            operations=self.demo.tally.operations,
            refusals=sum(self.demo.tally.refusals.values()),
            events=state.last_sequence,
            pending=state.finalize_pending_count,
            acked=_acked(self),
            dead_letters=state.finalize_failed_count,
            held=state.held_count,
            breaker=breaker.name,
            projection_lag=service.projector.status().lag_events,
            finalized=self.finalized,
        )


def _acked(run: _Run) -> int:
    """Charges the settlement service confirmed, counted by the metrics."""
    registry = run.stack.service.metrics.registry
    name = "billing_state_transitions_total"
    sources = ("FINALIZE_PENDING", "FINALIZE_FAILED")
    values = (registry.get_sample_value(name, {"from_state": s, "to_state": "FINALIZE_ACKED"}) for s in sources)
    return int(sum(value or 0 for value in values))


def _wal_batches(run: _Run) -> tuple[int, int]:
    """Group-commit batches and the records they carried, from the metrics."""
    registry = run.stack.service.metrics.registry
    count = registry.get_sample_value("wal_batch_records_count") or 0
    total = registry.get_sample_value("wal_batch_records_sum") or 0
    return int(count), int(total)


async def run_demo(settings: Settings, options: DemoOptions, console: Console) -> DemoResult:
    """Run every phase on a fresh data directory, audit everything, and say what happened."""
    async with contextlib.AsyncExitStack() as running:
        with console.status(STARTING):  # a few seconds before the live table has anything to show
            stack = await running.enter_async_context(demo_stack(settings))
        accounts = [f"acct-{index:03d}" for index in range(options.accounts)]
        demo = Demo(stack.service.engine, accounts, remote=stack.remote)
        budget = Budget(options.operations, options.rate_ops_s)
        run = _Run(stack, demo, options, Dashboard(console, stack.api_url), budget)
        poller = asyncio.create_task(run.poll_simulator())
        try:
            async with run.dashboard.live(run.snapshot, TICK_S):
                await run.phase("mint", lambda: mint(demo))
                await _traffic_phases(run)
                await run.phase("drain", lambda: _drain(run))
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        with console.status("Auditing: the WAL twice, the snapshot, the Redis projection, settlement's list…"):
            report = await _audit(stack, settings)
        return _result(run, settings, report, await stack.simulator.stats())


async def _traffic_phases(run: _Run) -> None:
    """Gateways run across traffic, outage and recovery; only the simulator's faults change."""
    seed = run.options.seed * 1_000_003
    gateways = [
        asyncio.create_task(gateway(run.demo, run.budget, seed + index)) for index in range(run.options.gateways)
    ]
    simulator = run.stack.simulator
    try:
        await run.phase("traffic", lambda: _for(run, "traffic"))
        await simulator.set_faults(outage=True)
        await run.phase("outage", lambda: _for(run, "outage"))
        run.pending_at_outage_end = run.stack.service.engine.state.finalize_pending_count
        await simulator.set_faults(outage=False)
        await run.phase("recovery", lambda: _for(run, "recovery"))
    finally:
        run.budget.stop()
        await asyncio.gather(*gateways)


async def _for(run: _Run, name: str) -> None:
    """Let the gateways work for this phase's share of the time (or until the operation cap)."""
    deadline = time.monotonic() + run.options.seconds * SHARES[name]
    while time.monotonic() < deadline and not run.budget.exhausted:  # noqa: ASYNC110 - a timeline, not an event
        await asyncio.sleep(TICK_S / 2)


async def _drain(run: _Run) -> None:
    """Wait until every charge is finalized and every hold is back; then the late commits."""
    engine = run.stack.service.engine
    deadline = time.monotonic() + DRAIN_WAIT_S_MAX
    while (engine.state.finalize_pending_count or engine.state.held_count) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(TICK_S / 2)
    await late_commits(run.demo)
    await engine.wait_durable(engine.state.last_sequence)
    await run.stack.service.projector.sync()


async def _audit(stack: Stack, settings: Settings) -> AuditReport:
    """The file audit, then the live comparisons, while the service is still up and idle."""
    report = await asyncio.to_thread(audit, settings.data_dir)
    service = stack.service
    if service.embedded is not None:
        report = report.with_section(await redis_section(report, service.embedded.url, service.keys))
    if service.settlement is not None:
        report = report.with_section(await settlement_section(report, service.settlement))
    return report


def _result(run: _Run, settings: Settings, report: AuditReport, stats: dict[str, Any]) -> DemoResult:
    batches, records = _wal_batches(run)
    settlement = Settlement(
        finalized=int(stats["finalized"]),
        calls_by_status={int(status): int(count) for status, count in stats["finalize_calls"].items()},
        breaker_opened=run.breaker_opened,
        pending_at_outage_end=run.pending_at_outage_end,
    )
    expired = sum(isinstance(event.payload, BillingReserveExpired) for event in iter_events(settings.wal_dir))
    return DemoResult(
        settings.data_dir,
        settings.durability,
        run.options,
        run.demo.tally,
        tuple(run.timings),
        expired,
        batches,
        records,
        settlement,
        report,
    )
