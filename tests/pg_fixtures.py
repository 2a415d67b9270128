"""PostgreSQL fixtures: one embedded server per test session, a fresh database per test.

Starting an :class:`~tollway.pg.server.EmbeddedPostgres` costs a few seconds (``initdb`` and
fsyncs), so one server serves the whole session and each test gets its own empty database
(``CREATE DATABASE`` from the template: tens of milliseconds), dropped afterwards. Nothing
leaks between tests but server-wide settings, which no test changes. The server is started in
a fresh temporary directory under the system's temporary directory (not ``tmp_path``: as root
the server runs as ``nobody``, who cannot search pytest's private base temporary directory). No
fixture ever touches a PostgreSQL that was already running on the machine.

The session fixture is synchronous (its own short event loops): the server is a process, and
every test connects from its own event loop by URL.

Import them into ``tests/conftest.py``::

    from tests.pg_fixtures import pg_pool, pg_server, pg_url
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tollway.pg.server import EmbeddedPostgres

_NAMES = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """The session's embedded PostgreSQL (fsync on, loopback); stopped and deleted at the end."""
    directory = Path(tempfile.mkdtemp(prefix="tollway-pg-"))
    server = asyncio.run(EmbeddedPostgres.start(directory))
    try:
        yield server
    finally:
        asyncio.run(server.stop())
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def pg_url(pg_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """The URL of a fresh, empty database on the session's server; dropped after the test."""
    name = f"test_{next(_NAMES)}"
    admin = await asyncpg.connect(pg_server.url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield pg_server.url.rsplit("/", 1)[0] + "/" + name
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def pg_pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small connection pool on this test's fresh database; closed after the test."""
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()
