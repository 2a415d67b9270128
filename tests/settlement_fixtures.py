"""The whole settlement loop as a fixture: engine → projection → Redis stream → worker → simulator.

Every part is real: WAL files with fsync, a private redis-server, the HTTP settlement simulator
verifying signed JWTs. Time is a :class:`~tollway.testing.FakeClock` shared by the engine, the
worker and the simulator, and the worker runs in burst mode (``run_once``), so tests decide
exactly when things happen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tollway import Engine, Settings
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.lifecycle import EntryState
from tollway.finalizer import FinalizeWorker
from tollway.redis.keys import Keys
from tollway.redis.projector import Projector
from tollway.redis.queue import FinalizeQueue
from tollway.redis.server import EmbeddedRedis
from tollway.settlement.client import SettlementAuth, SettlementClient
from tollway.settlement.sim_config import Faults, SimulatorConfig
from tollway.settlement.simulator import SimulatorServer
from tollway.testing import FakeClock
from tollway.tokens import generate_signing_key

KEYS = Keys("tw", "fin")
S = EntryState


@dataclass
class Loop:
    engine: Engine
    projector: Projector
    queue: FinalizeQueue
    worker: FinalizeWorker
    simulator: SimulatorServer
    clock: FakeClock
    client: aioredis.Redis
    settlement: SettlementClient
    alerts: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def faults(self, **changes: object) -> None:
        self.simulator.state.faults = Faults(**changes)  # type: ignore[arg-type]

    async def project(self) -> None:
        await self.projector.sync()

    async def drain(self, *, advance_ms: int = 0, rounds: int = 50) -> None:
        """Project and work until nothing is left to do now (optionally letting time pass each round)."""
        for _ in range(rounds):
            await self.project()
            handled = await self.worker.run_once()
            await self.project()
            if handled == 0 and advance_ms == 0:
                return
            self.clock.advance(advance_ms)

    def states(self) -> dict[str, EntryState]:
        """Every entry's state: whole (live) entries and settled entries' idempotency records."""
        state = self.engine.state
        states = {entry_id: entry.state for entry_id, entry in state.entries.items()}
        return states | {record.billing_entry_id: record.state for record in state.settled.records()}


@pytest.fixture
async def loop(tmp_path: Path, redis_server: EmbeddedRedis, clock: FakeClock) -> AsyncIterator[Loop]:
    """Settlement mode with every part real: WAL, redis-server, HTTP simulator, signed JWTs."""
    key = generate_signing_key()
    sim_config = SimulatorConfig(keys={key.kid: key.public()}, clock_ms=clock)
    settings = Settings(data_dir=tmp_path / "data", settlement_url="http://127.0.0.1:1", max_pending_reconciliation=3)
    client = aioredis.Redis.from_url(redis_server.url)
    async with SimulatorServer(sim_config) as simulator, Engine.open(settings=settings, clock=clock) as engine:
        settlement = SettlementClient.from_url(simulator.url, SettlementAuth(signing_key=key), clock_ms=clock)
        projector = Projector(engine, client, KEYS)
        queue = FinalizeQueue(client, KEYS, "worker-a")
        alerts: list[tuple[str, dict[str, object]]] = []
        worker = FinalizeWorker(engine, queue, settlement, claim_idle_ms=50, alert=lambda k, d: alerts.append((k, d)))
        try:
            await queue.ensure_group()
            yield Loop(engine, projector, queue, worker, simulator, clock, client, settlement, alerts)
        finally:
            await settlement.aclose()
            await client.aclose()


async def commit(loop: Loop, account: str, key: str, estimate: int, actual: int) -> str:
    held = await loop.engine.execute(cmd.Reserve(account, key, estimate))
    assert isinstance(held, EntryResult), held
    done = await loop.engine.execute(cmd.Commit(held.entry.billing_entry_id, actual))
    assert isinstance(done, EntryResult), done
    return held.entry.billing_entry_id


async def funded(loop: Loop, account: str = "acct", amount: int = 100_000_000) -> None:
    await loop.engine.execute(cmd.Credit(account, f"mint-{account}", CreditKind.MINT, amount))


def finalized(loop: Loop) -> dict[str, tuple[int, int]]:
    """What the simulator finalized: reservation → (amount, calls)."""
    page, _ = loop.simulator.state.book.page(None, 1000)
    return {record.reservation_id: (record.actual_cost_micro, record.calls) for record in page}
