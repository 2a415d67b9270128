"""The Redis boundary: redis-py's exceptions become tollway's own here, and nowhere else.

Everything outside :mod:`tollway.redis` that reaches Redis does so through this package's
classes and functions (the projector, the finalize queue, parity), whose public coroutines
are wrapped by :func:`at_boundary`. So the rest of tollway catches two exceptions of its own
tree, never redis-py's (httpx's ``map_httpcore_exceptions`` is the model):

- :class:`RedisDown` — Redis could not be reached: connection refused or lost, a timeout.
  Billing goes on from the WAL; whoever needed Redis retries later.
- :class:`RedisRefused` — Redis answered with an error (maxmemory under ``noeviction``, a
  read-only replica, ``MISCONF``, ``NOGROUP`` after a flush): nothing was applied.

Inside this package the projector's own loop still sees redis-py's classes
(:data:`REDIS_ERRORS`, :data:`REFUSALS`) where it must tell them apart from its own.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

import redis.exceptions

from tollway.core.errors import TollwayError

P = ParamSpec("P")
R = TypeVar("R")


class RedisDown(TollwayError):
    """Redis could not be reached (refused, lost, timed out); nothing is known to have been applied."""


class RedisRefused(TollwayError):
    """Redis is reachable but answered an error (maxmemory reached, a read-only replica, …): nothing was applied."""


REDIS_ERRORS: Final = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.RedisClusterException,  # a Redis Cluster slot with no reachable master, …
    OSError,
    RedisDown,
)
"""Redis unreachable, as redis-py and this boundary say it."""
REFUSALS: Final = (RedisRefused, redis.exceptions.ResponseError)
"""Redis answered but took nothing (a script's ``unwritable``, a plain command at maxmemory)."""
UNAVAILABLE: Final = (RedisDown, RedisRefused)
"""What callers outside this package catch: Redis cannot serve this now."""


def translate(exc: BaseException) -> TollwayError | None:
    """Tollway's exception for a redis-py one (None: not Redis's)."""
    if isinstance(exc, RedisDown | RedisRefused):
        return exc
    if isinstance(
        exc,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | redis.exceptions.RedisClusterException
        | OSError,
    ):
        return RedisDown(f"redis unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, redis.exceptions.RedisError):
        return RedisRefused(f"{type(exc).__name__}: {exc}")
    return None


def at_boundary(func: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Wrap a coroutine function: redis-py's exceptions leave it as :class:`RedisDown` or :class:`RedisRefused`."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return wrapper
