"""Shared fixtures: a fake clock and an engine on a real data directory (real files, real fsync)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tollway import Engine, Settings
from tollway.testing import FakeClock, RecordingObserver

# LiteLLM (imported by the tests of tollway.integrations.litellm) downloads its model cost map at
# import unless told to use the copy it ships: these tests run offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture
def clock() -> FakeClock:
    """A clock that only moves when a test moves it."""
    return FakeClock()


@pytest.fixture
def observer() -> RecordingObserver:
    """An observer that remembers what the engine reported."""
    return RecordingObserver()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings on a fresh data directory, durability on."""
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
async def engine(settings: Settings, clock: FakeClock, observer: RecordingObserver) -> AsyncIterator[Engine]:
    """A running engine over ``settings``; closed after the test."""
    async with Engine.open(settings=settings, clock=clock, observer=observer) as running:
        yield running


from tests.redis_fixtures import redis_client, redis_server, redis_url  # noqa: E402

__all__ = ["redis_client", "redis_server", "redis_url"]
from tests.pg_fixtures import pg_pool, pg_server, pg_url  # noqa: E402

__all__ += ["pg_pool", "pg_server", "pg_url"]
