"""Redis fixtures for the whole suite: a private embedded server per test, on a unix socket.

Starting and stopping an :class:`~tollway.redis.server.EmbeddedRedis` takes about 10 ms, so
every test gets its own server in ``tmp_path`` rather than sharing one per session with a
``FLUSHALL`` between tests: nothing leaks between tests (script cache, ``CONFIG SET``, client
names, a server killed by a previous test), and async fixtures stay on the test's own event
loop. No fixture ever touches a Redis that was already running on the machine.

Import them into ``tests/conftest.py``::

    from tests.redis_fixtures import redis_client, redis_server, redis_url
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from tollway.redis.server import EmbeddedRedis


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A fresh, empty embedded Redis in ``tmp_path``; stopped after the test."""
    server = await EmbeddedRedis.start(tmp_path / "redis")
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The ``unix://`` URL of this test's embedded Redis."""
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An async client (bytes replies) on this test's embedded Redis; closed after the test."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()
