"""The demo's simulated gateways: weighted scenarios of real gateway behaviour.

Each gateway loops over weighted scenarios until the :class:`Budget` says stop:
reserve → simulated inference → commit (mostly under the estimate, some overruns), a failed
stream released as ``pre_stream_failure``, a hold abandoned so that the expiry sweeper returns
it, a late commit refused as ``reservation_expired``, idempotent retries (a second reserve while
held gets ``request_in_progress``, a repeated commit is replayed), direct charges, admin voids,
top-ups and oversized requests refused for ``insufficient_funds``. Most gateways embed the
library (``engine.execute``); some call the HTTP API with the SDK, as a remote gateway would.

Inference is simulated by yielding to the event loop a few times, never by sleeping, so the
numbers measure billing, not a timer.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from tollway.client import ApiError, AsyncClient
from tollway.core import commands as cmd
from tollway.core.lifecycle import EntryState
from tollway.core.state import Entry
from tollway.engine import Engine

RICH_MINT_MICRO: Final = 10_000_000  # $10 for most accounts
POOR_MINT_MICRO: Final = 200_000  # $0.20 for every tenth account: it runs dry and gets refusals
TOP_UP_MICRO: Final = 1_000_000
ESTIMATE_MICRO_MIN: Final = 1_000
ESTIMATE_MICRO_MAX: Final = 40_000
ABANDON_TTL_S: Final = 1  # the shortest hold the engine accepts: abandoned holds expire quickly


@dataclass
class Tally:
    """What the gateways saw, counted as they went (owned by the event loop)."""

    operations: int = 0
    remote_operations: int = 0  # through the HTTP API
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


class Budget:
    """When the gateways stop (told to, or after ``operations``), and how fast they go.

    With ``rate_ops_s`` the gateways together make at most that many operations per second:
    the demo should show the loop keeping up, not a backlog that takes minutes to drain.
    """

    def __init__(self, operations: int | None, rate_ops_s: int | None = None) -> None:
        self.operations = operations
        self.rate_ops_s = rate_ops_s
        self.taken = 0
        self.started = time.monotonic()
        self._stopped = False

    async def take(self) -> bool:
        """Claim one more operation, waiting for the pace if needed; False when it is over."""
        if self._stopped or self.exhausted:
            return False
        self.taken += 1
        if self.rate_ops_s:
            ahead_s = self.taken / self.rate_ops_s - (time.monotonic() - self.started)
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)
        return not self._stopped

    def stop(self) -> None:
        """No more operations."""
        self._stopped = True

    @property
    def exhausted(self) -> bool:
        """The operation cap was reached."""
        return self.operations is not None and self.taken >= self.operations


@dataclass
class Demo:
    """What every scenario works with."""

    engine: Engine
    accounts: list[str]
    remote: AsyncClient | None = None  # the HTTP API, for the remote gateways
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
            if outcome.entry.state is EntryState.COMMITTED:  # voidable (standalone mode)
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


async def _remote(demo: Demo, rng: random.Random) -> None:
    """The same request through the HTTP API, as a gateway in another process would make it."""
    if demo.remote is None:
        await _normal(demo, rng)
        return
    demo.tally.remote_operations += 1
    estimate = _estimate(rng)
    try:
        entry = await demo.remote.reserve(rng.choice(demo.accounts), demo.new_id("http"), estimated_cost_micro=estimate)
        demo.tally.holds += 1
        await _inference(rng)
        actual = _actual(rng, estimate)
        await demo.remote.commit(entry.billing_entry_id, actual_cost_micro=actual, response={"text": "…"})
        demo.tally.committed += 1
        demo.tally.overruns += actual > estimate
    except ApiError as exc:
        demo.tally.refusals[exc.code] += 1


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
    """A stream that will outlive its hold: the drain tries to commit it after expiry."""
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
    """An admin refund of a committed charge (in settlement mode only dead letters are voidable)."""
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
    (_normal, 700),
    (_remote, 80),
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


async def gateway(demo: Demo, budget: Budget, seed: int) -> None:
    """One simulated gateway: scenarios until the budget says stop."""
    rng = random.Random(seed)
    scenarios, weights = zip(*SCENARIOS, strict=True)
    while await budget.take():
        await rng.choices(scenarios, weights)[0](demo, rng)
        demo.tally.operations += 1


async def mint(demo: Demo) -> None:
    """Prepaid credit for every account; every tenth is kept poor so it runs dry."""
    for index, account_id in enumerate(demo.accounts):
        amount = POOR_MINT_MICRO if index % 10 == 9 else RICH_MINT_MICRO
        await demo.run(cmd.Credit(account_id, "initial", cmd.CreditKind.MINT, amount, reason="demo credit"))
        demo.tally.minted_micro += amount


async def late_commits(demo: Demo) -> None:
    """Commit the holds that outlived their expiry: each is refused, never charged."""
    rng = random.Random(len(demo.late))
    await asyncio.gather(*(demo.commit(entry, _actual(rng, entry.estimated_cost_micro)) for entry in demo.late))
