"""The connection pool of a node (and of the tools that write a cluster's log).

asyncpg's default release runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
RESET ALL`` on every connection returned to the pool: one more round trip after every batch,
lease renewal and read. tollway never leaves session state behind (its only advisory lock is
transaction-scoped, it sets no session settings, declares no cursors, listens to nothing), so
its pools skip that query. asyncpg still rolls back a transaction left open before a
connection is reused, whatever the reset.
"""

from __future__ import annotations

from typing import Final

import asyncpg

APPLICATION_NAME_PREFIX: Final = "tollway "
"""A node's connections show as ``tollway <node id>`` in ``pg_stat_activity.application_name``."""
APPLICATION_NAME_MAX: Final = 63  # PostgreSQL truncates longer names (NAMEDATALEN - 1)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Nothing to reset: no session state is ever set (asyncpg rolls back an open transaction itself)."""
    del connection


async def open_pool(url: str, *, max_size: int, timeout_s: float, name: str | None = None) -> asyncpg.Pool:
    """A pool of at most ``max_size`` connections to ``url``, named ``tollway <name>`` when given."""
    settings = {} if name is None else {"application_name": f"{APPLICATION_NAME_PREFIX}{name}"[:APPLICATION_NAME_MAX]}
    pool: asyncpg.Pool = await asyncpg.create_pool(
        url, min_size=1, max_size=max_size, timeout=timeout_s, server_settings=settings, reset=_keep_session
    )
    return pool
