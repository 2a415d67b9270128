"""The Redis side of a cluster node's shards: projector and finalize worker, moving with the lease.

One Redis (or one Redis Cluster) serves every shard of a tollway cluster. A shard's keys are
today's layout under the shard's hash tag (:class:`~tollway.redis.keys.Keys` with the shard
number: ``<prefix>:{<shard>}:…``), so every script touches one Redis Cluster slot. The
projection's meta hash records who wrote it: ``owner`` is ``cluster <cluster id> shard <n>``
and ``epoch`` the writer's lease epoch; ``apply_batch.lua`` and ``claim_projection.lua``
refuse an older epoch or another owner (a single-node data directory or another cluster using
the same prefix).

:class:`RedisSide` is what a node shares among its shards (one client, one settlement client,
the settings); :func:`start_shard_redis` gives one shard, under one lease epoch, its projector
(from the node's :class:`~tollway.cluster.node.ShardEngines.start`) and, in settlement mode, its
finalize worker, which starts only once the projector has caught up or rebuilt the projection
(a rebuild recreates the finalize stream). Redis being away never delays serving the shard:
the projector catches up in the background, as in single-node mode. The tasks are cancelled on
hand-off and on loss; the next owner claims the projection with its higher epoch and catches
up from the shard's log in PostgreSQL (or rebuilds it from the recovered state if Redis lost it).

The shard's conservation guard (:mod:`tollway.cluster.shard_guard`) checks projection parity
against this projector and is told of a divergence it finds; it is started by the node after
this. Not here: the projection pump.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import redis.asyncio as aioredis

from tollway.config import Settings
from tollway.core.breaker import BreakerConfig
from tollway.core.errors import EngineStopped
from tollway.engine import Engine
from tollway.finalizer import FinalizeWorker
from tollway.redis.keys import Keys
from tollway.redis.projector import Projector, raise_if_cancelled
from tollway.redis.queue import FinalizeQueue
from tollway.settlement.client import SettlementClient

log = logging.getLogger("tollway.cluster")

FIRST_SYNC_POLL_S: Final = 0.05
"""How often a shard's finalize worker looks whether the projector has caught up, before it starts."""
STOP_TIMEOUT_S: Final = 5.0
"""Longest a hand-off waits for a shard's projector and worker to end once cancelled."""
RESTART_PAUSE_S: Final = 1.0
"""How long a shard's projector or worker that crashed waits before it runs again."""


def projection_owner(cluster_id: str, shard: int) -> str:
    """The owner a shard's projection records (meta field ``owner``)."""
    return f"cluster {cluster_id} shard {shard}"


@dataclass(frozen=True, slots=True)
class RedisSide:
    """What a node's shards share on the Redis side (built by the composition root)."""

    client: aioredis.Redis  # a redis.asyncio.Redis, or a RedisCluster (same command surface)
    cluster_id: str
    node_id: str
    settings: Settings
    settlement: SettlementClient | None = None

    def keys(self, shard: int) -> Keys:
        """The keys of ``shard``: the configured prefix, the shard number as the hash tag."""
        return Keys(self.settings.redis_prefix, str(shard))

    def breaker_config(self) -> BreakerConfig:
        """The settlement breaker of each shard's worker, from the settings."""
        s = self.settings
        return BreakerConfig(
            s.breaker_failure_threshold, s.breaker_window_ms, s.breaker_cooldown_ms, s.breaker_probe_timeout_ms
        )


@dataclass(slots=True)
class ShardRedis:
    """One shard's projector, finalize queue and (settlement mode) worker, and their tasks."""

    projector: Projector
    queue: FinalizeQueue
    worker: FinalizeWorker | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def stop(self) -> None:
        """Cancel the tasks at once (loss of the lease, hand-off)."""
        for task in self.tasks:
            task.cancel()

    async def stopped(self) -> None:
        """Cancel the tasks and wait until they ended (at most :data:`STOP_TIMEOUT_S`, then say which did not)."""
        self.stop()
        if not self.tasks:
            return
        _, stuck = await asyncio.wait(self.tasks, timeout=STOP_TIMEOUT_S)
        for task in stuck:
            log.error("%s did not stop within %s s of its cancellation", task.get_name(), STOP_TIMEOUT_S)


def start_shard_redis(
    side: RedisSide, engine: Engine, shard: int, epoch: int, still_owner: Callable[[], bool]
) -> ShardRedis:
    """Build shard ``shard``'s projector (and worker) for lease ``epoch`` and start their tasks.

    ``still_owner`` says whether the node still serves the shard under ``epoch`` (by its own
    clock); the worker handles no message otherwise (see :class:`~tollway.finalizer.FinalizeWorker`).
    """
    keys = side.keys(shard)
    owner = projection_owner(side.cluster_id, shard)
    settings = side.settings
    projector = Projector(
        engine, side.client, keys, coalesce_ms=settings.projection_coalesce_ms, owner=owner, epoch=epoch
    )
    queue = FinalizeQueue(side.client, keys, consumer=side.node_id, owner=owner)
    worker = None
    if side.settlement is not None:
        worker = FinalizeWorker(
            engine,
            queue,
            side.settlement,
            breaker_config=side.breaker_config(),
            concurrency=settings.worker_concurrency,
            claim_idle_ms=settings.claim_idle_ms,
            still_owner=still_owner,
        )
    running = ShardRedis(projector, queue, worker)
    running.tasks.append(_spawn(_supervised(projector.run, engine, f"projector-{shard}"), f"projector-{shard}"))
    if worker is not None:
        work = _supervised(lambda: _work_after_first_sync(projector, worker), engine, f"finalize-worker-{shard}")
        running.tasks.append(_spawn(work, f"finalize-worker-{shard}"))
    return running


async def _supervised(run: Callable[[], Awaitable[None]], engine: Engine, name: str) -> None:
    """Run ``run()`` again after an unexpected crash, while the shard's engine runs and nobody cancelled it.

    The loops survive Redis going away by themselves; this is for what escapes them. redis-py's
    cluster client, for one, can raise a bare ``AttributeError`` or ``RuntimeError`` from a
    connection a killed master closed (seen with redis-py 8.1 under uvloop): without a restart
    that shard would never be finalized again on this node. Never restarted: a task whose
    cancellation a library turned into another exception (the shard is being stopped), or a loop
    whose engine stopped (fenced, aborted, closed) — it would work for a shard it lost.
    """
    while True:
        try:
            await run()
        except Exception:
            raise_if_cancelled()
            try:
                engine.check_running()
            except EngineStopped:
                log.warning("%s stopped with its shard's engine", name)
                return
            log.exception("%s crashed; running it again in %s s", name, RESTART_PAUSE_S)
            await asyncio.sleep(RESTART_PAUSE_S)
        else:
            return


async def _work_after_first_sync(projector: Projector, worker: FinalizeWorker) -> None:
    """Run the worker once the projection is caught up (or rebuilt) under this epoch."""
    while projector.applied_seq is None:  # noqa: ASYNC110 - the projector exposes its sequence, not an event
        await asyncio.sleep(FIRST_SYNC_POLL_S)
    await worker.run()


def _spawn(coro: object, name: str) -> asyncio.Task[None]:
    task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
    task.add_done_callback(_report_crash)
    return task


def _report_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.critical("background task %s stopped: %r", task.get_name(), exc)
