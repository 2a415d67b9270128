"""The running service: engine, Redis, projector, finalize worker and expiry sweeper, assembled.

:meth:`Service.running` is the runtime half of the composition root (the CLI and the app
factory are the other half: they read configuration and call this). It opens the engine
(recovering from disk), connects to Redis — a private embedded ``redis-server`` in
``<data_dir>/redis`` unless ``redis_url`` is set — and starts the background tasks:

- the projector (Redis catches up from the WAL; Redis being down never stops billing; a
  projection that diverges from the WAL is rebuilt at once, the guard told);
- with the embedded Redis, its watch (a redis-server that dies is started again, and the
  projection rebuilt from the WAL, without restarting tollway);
- the guard's periodic projection parity check (``parity_check_interval_s``);
- the finalize worker, in settlement mode only (a ``settlement_url`` is configured);
- the expiry sweeper and the archiver (:mod:`tollway.housekeeping`; entries past
  ``entry_retention_hours`` leave memory and Redis);
- the conservation guard, which gates new holds until its startup checks pass.

Metrics are collected by a :class:`~tollway.metrics.MetricsObserver` on the engine and by
:meth:`Service.collect_metrics` just before a scrape.

On exit the tasks are stopped, the projector gets one last bounded chance to catch up, the
engine finishes pending writes and takes a snapshot, and the embedded Redis is shut down.
Nothing here decides anything about money.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import redis.asyncio as aioredis

from tollway.config import Settings
from tollway.core.breaker import BreakerConfig
from tollway.core.observer import Observer
from tollway.engine import Engine, system_clock_ms
from tollway.finalizer import Alert, FinalizeWorker
from tollway.guard import GuardRunner, lenient_parity, redis_parity
from tollway.housekeeping import run_archiver, run_sweeper
from tollway.logs import direct_json_lines, structlog_alert
from tollway.metrics import Metrics, MetricsObserver
from tollway.redis.errors import UNAVAILABLE
from tollway.redis.keys import Keys
from tollway.redis.projector import ProjectionForeign, ProjectionViolation, Projector
from tollway.redis.pump import ProjectionPump
from tollway.redis.queue import FinalizeQueue
from tollway.redis.server import EmbeddedRedis, ServerWatch
from tollway.settlement.client import SettlementAuth, SettlementClient
from tollway.tokens import SigningKey, load_or_create_signing_key

log = logging.getLogger("tollway.service")

SETTLEMENT_KEY_FILE: Final = "settlement-signing-key.pem"
FINAL_SYNC_TIMEOUT_S: Final = 5.0
TASK_STOP_TIMEOUT_S: Final = 10.0
FIRST_SYNC_TIMEOUT_S: Final = 30.0
REDIS_SOCKET_TIMEOUT_S: Final = 5.0


def keys_dir(settings: Settings) -> Path:
    """Where the service keeps its generated signing keys (mode 0700)."""
    return settings.data_dir / "keys"


def settlement_signing_key(settings: Settings) -> tuple[SigningKey, bool]:
    """The key that signs finalize calls, created in the data directory on first use."""
    directory = keys_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_or_create_signing_key(directory, SETTLEMENT_KEY_FILE)


def redis_keys(settings: Settings) -> Keys:
    """The key layout of this service's shard."""
    return Keys(settings.redis_prefix, settings.shard)


def settlement_client(settings: Settings, clock: Callable[[], int] = system_clock_ms) -> SettlementClient:
    """The client of the configured settlement service, signing with the data directory's key."""
    assert settings.settlement_url is not None
    key, created = settlement_signing_key(settings)
    if created:
        log.warning("created a settlement signing key in %s (kid %s)", keys_dir(settings), key.kid)
    secret = settings.settlement_hs256_secret.encode() if settings.settlement_hs256_secret else None
    auth = SettlementAuth(
        signing_key=None if settings.settlement_allow_hs256 and secret else key,
        hs256_secret=secret,
        allow_hs256=settings.settlement_allow_hs256,
        issuer=settings.settlement_issuer,
        audience=settings.settlement_audience,
        tenant_id=settings.settlement_tenant_id,
    )
    return SettlementClient.from_url(
        settings.settlement_url, auth, clock_ms=clock, timeout_ms=settings.settlement_timeout_ms
    )


class Service:
    """One engine and everything that runs beside it. Create it with :meth:`running`."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: aioredis.Redis,
        embedded: EmbeddedRedis | None,
        metrics: Metrics,
        *,
        guard_bypass: bool = False,
        pump: ProjectionPump | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = client
        self.embedded = embedded
        self.metrics = metrics
        self.keys = redis_keys(settings)
        self.projector = Projector(engine, client, self.keys, coalesce_ms=settings.projection_coalesce_ms, pump=pump)
        self.queue = FinalizeQueue(client, self.keys, consumer=f"worker-{os.getpid()}", owner=engine.identity)
        self.redis_watch = None if embedded is None else ServerWatch(embedded, clock_ms=engine.now_ms)
        self.settlement: SettlementClient | None = None
        self.worker: FinalizeWorker | None = None
        self.guard = GuardRunner(
            engine,
            parity=lenient_parity(redis_parity(engine, self.projector)),
            bypass=guard_bypass,
            on_checked=metrics.guard_checked,
        )
        self.projector.on_divergence = self.guard.projection_diverged
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        settings: Settings,
        *,
        clock: Callable[[], int] = system_clock_ms,
        observer: Observer | None = None,
        alert: Alert | None = None,
        guard_bypass: bool = False,
        background: bool = True,
    ) -> AsyncIterator[Service]:
        """Start everything; on exit, stop it in order. ``background=False`` starts no task (tests).

        ``guard_bypass`` is the break-glass ``TOLLWAY_GUARD_BYPASS=true``: holds are allowed
        whatever the checks say, and the bypass is written to the WAL as an audit event.
        """
        async with contextlib.AsyncExitStack() as stack:  # on exit: stop, pump, embedded Redis, engine
            metrics = Metrics()
            engine = await Engine.start(
                settings, clock=clock, observer=observer or MetricsObserver(metrics, json_lines=direct_json_lines)
            )
            stack.push_async_callback(engine.close)
            embedded: EmbeddedRedis | None = None
            if settings.redis_url is None:
                embedded = await EmbeddedRedis.start(
                    settings.data_dir / "redis",
                    memory_bytes_max=settings.redis_memory_bytes_max,
                    nice=settings.redis_nice,
                )
                stack.push_async_callback(embedded.stop)
            url = settings.redis_url or (embedded.url if embedded else "")
            client = aioredis.Redis.from_url(url, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
            pump = (
                await ProjectionPump.start(url, redis_keys(settings), engine.identity) if settings.uses_pump else None
            )
            if pump is not None:
                stack.push_async_callback(pump.close)
            service = cls(settings, engine, client, embedded, metrics, guard_bypass=guard_bypass, pump=pump)
            service._start_settlement(clock, alert or structlog_alert(metrics))
            if background:
                await service._first_sync()
                service._start_background()
            await service.guard.start()
            stack.push_async_callback(service._stop)
            yield service

    async def collect_metrics(self) -> None:
        """Refresh the state gauges (queue depths, lag, breaker, guard) before a scrape."""
        await self.metrics.collect_from(
            engine=self.engine,
            worker=self.worker,
            projector=self.projector,
            queue=self.queue,
            guard=self.guard.guard,
            redis_watch=self.redis_watch,
        )

    def _start_settlement(self, clock: Callable[[], int], alert: Alert) -> None:
        settings = self.settings
        if settings.settlement_url is None:
            return
        self.settlement = settlement_client(settings, clock)
        self.worker = FinalizeWorker(
            self.engine,
            self.queue,
            self.settlement,
            breaker_config=BreakerConfig(
                settings.breaker_failure_threshold,
                settings.breaker_window_ms,
                settings.breaker_cooldown_ms,
                settings.breaker_probe_timeout_ms,
            ),
            concurrency=settings.worker_concurrency,
            claim_idle_ms=settings.claim_idle_ms,
            alert=alert,
        )

    async def _first_sync(self) -> None:
        """Bring the projection up to date (rebuilding it if Redis lost it) before the worker reads.

        A rebuild recreates the finalize stream and its consumer group; a worker started first
        would find them gone. Redis being away is no reason to wait: the projector catches up.
        """
        try:
            async with asyncio.timeout(FIRST_SYNC_TIMEOUT_S):
                await self.projector.sync()
        except (TimeoutError, *UNAVAILABLE) as exc:
            log.warning("projection not caught up at start (the projector keeps trying): %s", exc)
        except ProjectionViolation as exc:  # the projector repairs it as soon as it runs
            self.projector.request_repair(str(exc))

    def _start_background(self) -> None:
        self._spawn(self.projector.run(), "projector")
        if self.redis_watch is not None:
            self._spawn(self.redis_watch.run(), "redis-watch")
        if self.settings.parity_check_interval_s:
            watch = self.guard.watch_parity(self.settings.parity_check_interval_s, self.projector.request_repair)
            self._spawn(watch, "parity-watch")
        self._spawn(run_sweeper(self.engine), "sweeper")
        self._spawn(run_archiver(self.engine), "archiver")
        if self.worker is not None:
            self._spawn(self.worker.run(), "finalize-worker")

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        task.add_done_callback(_report_crash)
        self._tasks.append(task)

    async def _stop(self) -> None:
        await self.guard.close()
        for task in self._tasks:
            task.cancel()
        done, stuck = await asyncio.wait(self._tasks, timeout=TASK_STOP_TIMEOUT_S) if self._tasks else (set(), set())
        for task in stuck:  # a bug: say so (where it hangs), and do not wait forever for it
            where = io.StringIO()
            task.print_stack(file=where)
            log.error(
                "background task %s did not stop within %s s: %s",
                task.get_name(),
                TASK_STOP_TIMEOUT_S,
                where.getvalue(),
            )
        for task in done:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.engine.wait_durable(self.engine.state.last_sequence)
        try:
            async with asyncio.timeout(FINAL_SYNC_TIMEOUT_S):
                await self.projector.sync()
        except (TimeoutError, *UNAVAILABLE, ProjectionViolation, ProjectionForeign) as exc:
            log.warning("projection not fully caught up at shutdown (it will at the next start): %s", exc)
        if self.settlement is not None:
            await self.settlement.aclose()
        await self.redis.aclose()


def _report_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.critical("background task %s stopped: %r", task.get_name(), exc)
