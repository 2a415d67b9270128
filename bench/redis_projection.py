"""The Redis half of ``bench/engine.py --redis``: the projector under load, and a Redis ceiling.

- :func:`projecting` runs a :class:`~tollway.redis.projector.Projector` into a private
  ``redis-server`` beside the engine (same event loop, as in ``tollway serve``) and samples its
  lag every few milliseconds: the lag in events and in milliseconds (age of the oldest
  durable event not yet in Redis), and how long the projection needs to catch up at the end;
  with :func:`redis_usage` around the window, how busy redis-server was (``redis_cpu_busy``,
  its own CPU time) and the script's time per event (``redis_script_us_per_event``, from
  ``INFO commandstats``): which side — the event loop or Redis — limits the projection.
- :func:`evalsha_per_s` is the ceiling: sequential ``EVALSHA`` calls of a trivial script
  through the same client library (redis-py with hiredis) on the same kind of server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from tollway.engine import Engine
from tollway.redis.keys import Keys
from tollway.redis.projector import Projector
from tollway.redis.pump import ProjectionPump
from tollway.redis.server import EmbeddedRedis

SAMPLE_INTERVAL_S = 0.005
CATCH_UP_TIMEOUT_S = 60.0


@dataclass
class LagSamples:
    """Projection lag seen while the measuring window was open."""

    measuring: bool = False
    lag_ms: list[int] = field(default_factory=list)
    lag_events: list[int] = field(default_factory=list)
    applied_at_start: int = 0
    applied_at_end: int = 0
    redis_at_start: tuple[float, int, int] = (0.0, 0, 0)
    redis_at_end: tuple[float, int, int] = (0.0, 0, 0)


async def redis_usage(client: aioredis.Redis) -> tuple[float, int, int]:
    """redis-server's own CPU seconds, and its EVALSHA calls and microseconds (INFO cpu, commandstats)."""
    cpu = await client.info("cpu")
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    seconds = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return seconds, int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def _sample(projector: Projector, samples: LagSamples, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if samples.measuring:
            status = projector.status()
            samples.lag_ms.append(status.lag_ms)
            samples.lag_events.append(status.lag_events)
        await asyncio.sleep(SAMPLE_INTERVAL_S)


@contextlib.asynccontextmanager
async def projecting(engine: Engine, directory: Path) -> AsyncIterator[tuple[Projector, LagSamples]]:
    """A projector into a private redis-server, running until the block ends."""
    async with EmbeddedRedis(directory) as server:
        client = aioredis.Redis.from_url(server.url)
        keys, settings = Keys("bench", "0"), engine.settings
        pump = await ProjectionPump.start(server.url, keys, engine.identity) if settings.uses_pump else None
        projector = Projector(engine, client, keys, coalesce_ms=settings.projection_coalesce_ms, pump=pump)
        samples, stop = LagSamples(), asyncio.Event()
        tasks = [asyncio.create_task(projector.run()), asyncio.create_task(_sample(projector, samples, stop))]
        try:
            yield projector, samples
        finally:
            stop.set()
            tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if pump is not None:
                await pump.close()
            await client.aclose()


async def catch_up_s(projector: Projector, engine: Engine) -> float:
    """Seconds until the projection holds every durable event (after the load stopped)."""
    started = time.perf_counter()
    async with asyncio.timeout(CATCH_UP_TIMEOUT_S):
        while (projector.applied_seq or 0) < engine.durable_sequence:  # noqa: ASYNC110 - polling another task's progress
            await asyncio.sleep(0.001)
    return round(time.perf_counter() - started, 3)


def lag_report(samples: LagSamples, window_s: float, catch_up: float) -> dict[str, Any]:
    """The projection figures of one load window."""
    applied = samples.applied_at_end - samples.applied_at_start
    ordered_ms = sorted(samples.lag_ms) or [0]
    cpu_s, calls, usec = (end - start for end, start in zip(samples.redis_at_end, samples.redis_at_start, strict=True))
    return {
        "redis_cpu_busy": round(cpu_s / window_s, 3) if window_s else None,
        "redis_calls": calls,
        "redis_events_per_call": round(applied / calls, 1) if calls else None,
        "redis_script_us_per_event": round(usec / applied, 2) if applied else None,
        "projected_events_per_s": round(applied / window_s) if window_s else None,
        "projection_lag_ms_max": ordered_ms[-1],
        "projection_lag_ms_p99": ordered_ms[min(len(ordered_ms) - 1, int(len(ordered_ms) * 0.99))],
        "projection_lag_events_max": max(samples.lag_events or [0]),
        "projection_catch_up_s": catch_up,
        "lag_samples": len(samples.lag_ms),
    }


async def _evalsha_rate(directory: Path, seconds: float) -> dict[str, Any]:
    async with EmbeddedRedis(directory) as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            script = client.register_script("return 1")
            await script()
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                await script()
                calls += 1
            elapsed = time.perf_counter() - started
        finally:
            await client.aclose()
    return {"redis_evalsha_per_s": round(calls / elapsed), "redis_evalsha_seconds": round(elapsed, 2)}


def evalsha_per_s(directory: Path, seconds: float) -> dict[str, Any]:
    """Sequential EVALSHA calls of ``return 1`` per second (the projector's call pattern)."""
    return asyncio.run(_evalsha_rate(directory, seconds))
