"""The conservation guard of a cluster node's shard: one :class:`~tollway.guard.GuardRunner` per engine.

Each shard a node serves has its own engine, so it has its own guard (SPEC §9), moving with
the lease like the projector: :func:`start_shard_guard` runs from the node's
:meth:`~tollway.cluster.node.ShardEngines.start`, after the shard is recovered and *before*
the node serves it, so the gate on new holds is closed until the startup checks pass and a
hold never reaches an unchecked shard. Commits, releases and settlement outcomes are never
gated. The guard is closed when the shard is handed off or lost; the next owner starts a new
one on the state it recovers.

What a shard's guard checks:

- the state checks (ledger zero-sum, budget conservation, …) on a consistent copy of the
  shard's state, at start, on reset and on a retry;
- the per-event checks on every durable batch of the shard's log;
- with Redis, projection parity against the shard's projector: at start with a single
  look bounded by :data:`STARTUP_PARITY_TIMEOUT_S` (the node's membership tick waits for a
  shard's start, and a new owner's projector has not caught up yet: a projection that is not
  at the recovered sequence is *catching up*, which passes, SPEC §9), then every
  ``parity_check_interval_s`` patiently as in single-node mode; a projection found differing
  (by that check, or by the projector's own scripts) degrades the guard with recovery stopped
  and makes the projector rebuild it from the log; an admin audits and resets.

A parity check that cannot run (Redis away, a Redis Cluster failing over, a projection that
will not hold still) never blocks billing: it passes with a warning.

What it does not do: fold the shard's log into an independent ledger (``verify_wal_ledger``,
which reads the file WAL; a shard's log in PostgreSQL is folded by ``tollway cluster audit``).
The break-glass bypass (``TOLLWAY_GUARD_BYPASS``) is read by the composition root and given
here; each shard's bypass is written to that shard's log as an ``audit`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Final

from tollway.core.errors import EngineStopped
from tollway.core.guard import CheckResult, CheckStatus, Guard
from tollway.engine import Engine
from tollway.guard import GuardRunner, ParityCheck, lenient_parity, redis_parity
from tollway.redis.projector import Projector, raise_if_cancelled

log = logging.getLogger("tollway.guard")

STARTUP_PARITY_TIMEOUT_S: Final = 1.0
"""Longest a shard's start waits for its first projection parity look (the membership tick waits for it)."""


class ShardGuard:
    """One shard's guard, its periodic parity task, and the violations it found (for ``/metrics``)."""

    def __init__(self, engine: Engine, shard: int, parity: ParityCheck | None, *, bypass: bool) -> None:
        self.shard = shard
        self.violations: Counter[str] = Counter()  # check name -> check runs that found it violated
        self.watch: asyncio.Task[None] | None = None
        self.runner = GuardRunner(engine, parity=parity, bypass=bypass, on_checked=self._checked)

    def _checked(self, _guard: Guard, results: tuple[CheckResult, ...]) -> None:
        """The runner's ``on_checked``: count each violated check once per run."""
        self.violations.update(r.name for r in results if r.status is CheckStatus.VIOLATED)

    async def close(self) -> None:
        """Stop the parity task and a pending retry (the shard leaves this node)."""
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.watch
        await self.runner.close()


class _ShardParity:
    """Projection parity of one shard: one bounded look while the shard starts, patient afterwards."""

    def __init__(self, engine: Engine, projector: Projector, shard: int) -> None:
        self.starting = True
        self.shard = shard
        self._quick = lenient_parity(redis_parity(engine, projector, attempts_max=1))
        self._patient = lenient_parity(redis_parity(engine, projector))

    async def __call__(self) -> list[str]:
        try:
            if self.starting:
                async with asyncio.timeout(STARTUP_PARITY_TIMEOUT_S):
                    return await self._quick()
            return await self._patient()
        except TimeoutError:
            log.warning(
                "shard %d: projection parity not checked at start (Redis slow); it is checked later", self.shard
            )
        except EngineStopped:
            pass  # the shard is leaving this node; its guard is closed with it
        except Exception:  # redis-py's cluster client may raise AttributeError or RuntimeError
            raise_if_cancelled()
            log.exception("shard %d: projection parity could not run; billing goes on", self.shard)
        return []


async def start_shard_guard(
    engine: Engine,
    shard: int,
    projector: Projector | None,
    *,
    bypass: bool = False,
    parity_interval_s: int = 0,
) -> ShardGuard:
    """Start shard ``shard``'s guard on ``engine``; returns once the startup checks ran (the gate set).

    With a ``projector``, the guard checks projection parity against it, the projector tells
    the guard of a divergence it finds, and every ``parity_interval_s`` (0: never) a task
    checks parity and asks the projector to rebuild on a difference. Raises what the engine
    raises when the bypass's audit event cannot be written (the shard is not served then).
    """
    parity: _ShardParity | None = None if projector is None else _ShardParity(engine, projector, shard)
    made = ShardGuard(engine, shard, parity, bypass=bypass)
    if projector is not None:  # before the projector's task first runs: nothing is missed
        projector.on_divergence = made.runner.projection_diverged
    try:
        await made.runner.start()
    except BaseException:
        await made.runner.close()
        raise
    if parity is not None and projector is not None:
        parity.starting = False
        if parity_interval_s:
            watch = made.runner.watch_parity(parity_interval_s, projector.request_repair)
            made.watch = asyncio.create_task(watch, name=f"parity-watch-{shard}")
    return made
