"""A node of a cluster: one engine per shard it holds, and where every other shard is answered.

:class:`ShardEngines` is the :class:`~tollway.cluster.membership.ShardHandler` of a node:

- ``start(lease)`` recovers the shard from PostgreSQL (:func:`~tollway.cluster.shard_log.start_shard_engine`)
  and starts its expiry sweeper and archiver and, with Redis configured, its projector and (in
  settlement mode) its finalize worker (:mod:`tollway.cluster.shard_redis`), all under the
  lease's epoch, then its conservation guard (:mod:`tollway.cluster.shard_guard`), whose startup
  checks run before it returns: the node serves the shard once it returns, with the gate on new
  holds already set by the guard;
- ``hand_off(shard)`` (SIGTERM, rebalancing) stops taking commands for the shard (requests get
  ``shard_moved``), closes its guard, lets the engine finish its batch and write a final snapshot row, and only
  then lets membership release the lease, so the next owner starts at once;
- ``lost(shard)`` (the lease may be gone) stops the shard at once: its engine is aborted (its
  guard closed) and its waiting callers get a retryable error. A shard whose engine stopped (a batch refused by
  the fence, or a batch whose outcome PostgreSQL never confirmed: ``LogOutcomeUnknown``) is
  dropped the same way and its lease released (or left to expire if PostgreSQL does not
  answer): a node (this one too) acquires it with a new epoch and recovers the shard from what
  PostgreSQL holds, which says whether that batch landed; a retry with the same request id
  takes effect once either way.

:class:`Node` ties membership, the engines and the cluster's view together and answers the one
question a request asks (:meth:`Node.route`): the local engine of the shard, the URL of the
node that owns it (forward one hop), or nobody right now (503 ``shard_moved``). The owners are
the lease rows (live, by PostgreSQL's clock) and the registry's advertised URLs, refreshed every
tick. A node answers for a shard only while :meth:`Membership.serving` says so by its own
monotonic clock, so two nodes never answer for one shard at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import asyncpg

from tollway.cluster.membership import Membership
from tollway.cluster.shard_guard import ShardGuard, start_shard_guard
from tollway.cluster.shard_log import start_shard_engine
from tollway.cluster.shard_redis import RedisSide, ShardRedis, start_shard_redis
from tollway.config import Settings
from tollway.core.errors import LogUnavailable, TollwayError
from tollway.core.lease import LeaseTiming
from tollway.core.shard import shard, shard_of_entry_id
from tollway.engine import Engine
from tollway.housekeeping import run_archiver, run_sweeper
from tollway.pg import leases
from tollway.pg.leases import Lease, LeaseRow
from tollway.pg.log import PgLog
from tollway.pg.schema import ClusterInfo

log = logging.getLogger("tollway.cluster")

HAND_OFF_TIMEOUT_S: Final = 10.0
"""Longest a hand-off waits for the shard's last batch and snapshot before it aborts the engine."""


@dataclass(slots=True)
class _Running:
    engine: Engine
    epoch: int
    tasks: list[asyncio.Task[None]]
    guard: ShardGuard
    redis: ShardRedis | None = None


class ShardEngines:
    """The engines of the shards a node holds (a :class:`~tollway.cluster.membership.ShardHandler`)."""

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, redis_side: RedisSide | None = None, *, guard_bypass: bool = False
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.redis_side = redis_side
        self.guard_bypass = guard_bypass  # TOLLWAY_GUARD_BYPASS, read by the composition root
        self.running: dict[int, _Running] = {}
        self.moving: set[int] = set()  # in hand-off: no new commands
        self.on_failed: Callable[[int], None] = lambda _shard: None  # the node drops the shard
        self.serving: Callable[[int], int | None] = lambda _shard: None  # the node's Membership.serving
        self._aborts: set[asyncio.Task[None]] = set()

    def engine(self, number: int, epoch: int) -> Engine | None:
        """The engine of shard ``number`` if it runs under ``epoch`` and takes commands."""
        running = self.running.get(number)
        if running is None or running.epoch != epoch or number in self.moving:
            return None
        return running.engine

    async def start(self, lease: Lease) -> None:
        """Recover the shard, start its housekeeping, Redis side and guard; it is served once this returns."""
        number, epoch = lease.shard, lease.epoch
        engine = await start_shard_engine(PgLog(self.pool, number), epoch, self.settings)
        engine.on_fatal = lambda _exc: self.on_failed(number)  # fenced, or PostgreSQL failed a batch
        side = self.redis_side
        redis = (
            None
            if side is None
            else start_shard_redis(side, engine, number, epoch, lambda: self.serving(number) == epoch)
        )
        try:
            guard = await start_shard_guard(
                engine,
                number,
                None if redis is None else redis.projector,
                bypass=self.guard_bypass,
                parity_interval_s=self.settings.parity_check_interval_s,
            )
        except BaseException:  # not served: stop what started (the caller releases the lease)
            if redis is not None:
                redis.stop()
            await engine.abort()
            raise
        tasks = [asyncio.create_task(run_sweeper(engine)), asyncio.create_task(run_archiver(engine))]
        self.running[number] = _Running(engine, epoch, tasks, guard, redis)
        log.info(
            "shard %d recovered at sequence %d, epoch %d; guard %s",
            number,
            engine.state.last_sequence,
            epoch,
            guard.runner.guard.state.value,
        )

    def guard(self, number: int) -> ShardGuard | None:
        """The guard of shard ``number`` while its engine runs here."""
        running = self.running.get(number)
        return None if running is None else running.guard

    async def hand_off(self, number: int) -> None:
        """Stop taking commands, finish the batch, write a snapshot row; the lease is released after."""
        running = self.running.get(number)
        if running is None:
            return
        self.moving.add(number)
        try:
            await running.guard.close()
            if running.redis is not None:  # the next owner catches the projection up from the log
                await running.redis.stopped()
            await _stop_tasks(running.tasks)
            try:
                await asyncio.wait_for(running.engine.close(), HAND_OFF_TIMEOUT_S)
            except (TollwayError, TimeoutError, OSError):
                log.exception("shard %d: hand-off could not finish cleanly; aborting its engine", number)
                await running.engine.abort()
        finally:
            del self.running[number]
            self.moving.discard(number)

    def lost(self, number: int) -> None:
        """Stop the shard at once: its engine is aborted, waiting callers get a retryable error."""
        running = self.running.pop(number, None)
        if running is None:
            return
        for task in running.tasks:
            task.cancel()
        if running.redis is not None:
            running.redis.stop()
        abort = asyncio.get_running_loop().create_task(_abort(running))
        self._aborts.add(abort)
        abort.add_done_callback(self._aborts.discard)

    async def close(self) -> None:
        """Abort whatever still runs (after :meth:`Membership.leave` handed every shard off)."""
        for number in sorted(self.running):
            self.lost(number)
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)


async def _abort(running: _Running) -> None:
    """Abort the engine at once, closing its guard alongside."""
    await asyncio.gather(running.engine.abort(), running.guard.close())


async def _stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request for one shard goes: ``engine`` here, or ``forward_url``, or neither (shard moving)."""

    shard: int
    engine: Engine | None = None
    forward_url: str | None = None
    epoch: int = 0  # the lease epoch the local engine writes with


class Node:
    """One node: membership, the engines of its shards, and the cluster's owners; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        info: ClusterInfo,
        settings: Settings,
        *,
        node_id: str,
        advertise_url: str,
        timing: LeaseTiming,
        redis_side: RedisSide | None = None,
        guard_bypass: bool = False,
    ) -> None:
        self.pool = pool
        self.info = info
        self.node_id = node_id
        self.advertise_url = advertise_url
        self.engines = ShardEngines(pool, settings, redis_side, guard_bypass=guard_bypass)
        self.membership = Membership(
            pool,
            node_id=node_id,
            advertise_url=advertise_url,
            shards=info.shards,
            timing=timing,
            handler=self.engines,
        )
        self.engines.on_failed = lambda number: self.membership.forfeit(number, "its engine stopped (fenced or failed)")
        self.engines.serving = self.membership.serving
        self.lease_rows: list[LeaseRow] = []
        self.urls: dict[str, str] = {}

    def shard_of_account(self, account_id: str) -> int:
        """The shard of ``account_id`` in this cluster."""
        return shard(account_id, self.info.shards)

    def shard_of_entry(self, billing_entry_id: str) -> int:
        """The shard of a billing entry id (its characters 10-11)."""
        return shard_of_entry_id(billing_entry_id, self.info.shards)

    def route(self, number: int) -> Route:
        """The local engine of shard ``number``, the owner's URL, or neither (answer ``shard_moved``)."""
        epoch = self.membership.serving(number)
        if epoch is not None:
            return Route(number, engine=self.engines.engine(number, epoch), epoch=epoch)
        row = self.lease_rows[number] if number < len(self.lease_rows) else None
        if row is None or not row.live or row.owner is None or row.owner == self.node_id:
            return Route(number)
        return Route(number, forward_url=self.urls.get(row.owner))

    def local_redis(self) -> dict[int, ShardRedis]:
        """The Redis side (projector, queue, worker) of each shard this node serves now."""
        served = self.local_engines()
        return {
            number: running.redis
            for number, running in self.engines.running.items()
            if number in served and running.redis is not None
        }

    def local_guards(self) -> dict[int, ShardGuard]:
        """The conservation guard of each shard this node serves now."""
        return {number: guard for number in self.local_engines() if (guard := self.engines.guard(number)) is not None}

    def local_engines(self) -> dict[int, Engine]:
        """The engines this node serves now, by shard."""
        served: dict[int, Engine] = {}
        for number in sorted(self.membership.held):
            engine = self.engines.engine(number, self.membership.serving(number) or -1)
            if engine is not None:
                served[number] = engine
        return served

    async def tick(self) -> None:
        """One membership round, then a fresh view of the owners and their URLs."""
        await self.membership.tick()
        try:
            self.lease_rows = await leases.lease_rows(self.pool)
            self.urls = {n.node_id: n.advertise_url for n in await leases.live_nodes(self.pool, _window(self))}
        except LogUnavailable as exc:
            log.warning("node %s could not refresh the shard map: %s", self.node_id, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``renew_every_ms / 2`` until ``stop`` is set."""
        while not stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.membership.timing.renew_every_ms / 2000)

    async def leave(self) -> None:
        """Graceful: hand every shard off (batch finished, snapshot written, lease released), deregister."""
        try:
            await self.membership.leave()
        finally:
            await self.engines.close()

    def view(self) -> dict[str, object]:
        """The cluster as this node sees it: ``GET /v1/cluster`` and ``tollway cluster status``."""
        return {
            "cluster_id": self.info.cluster_id,
            "shards": self.info.shards,
            "node_id": self.node_id,
            "nodes": [{"node_id": node_id, "advertise_url": url} for node_id, url in sorted(self.urls.items())],
            "serving": sorted(self.local_engines()),
            "shard_map": [
                {
                    "shard": row.shard,
                    "owner": row.owner if row.live else None,
                    "epoch": row.epoch,
                    "last_seq": row.last_seq,
                }
                for row in self.lease_rows
            ],
        }


def _window(node: Node) -> int:
    return node.membership.timing.ttl_ms
