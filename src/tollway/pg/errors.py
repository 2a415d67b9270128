"""What asyncpg raises when PostgreSQL cannot be used: one tuple for every boundary of this package.

Each module of :mod:`tollway.pg` catches :data:`PG_ERRORS` around its statements and raises
:class:`~tollway.core.errors.LogUnavailable` (or a more precise error of the tollway tree)
``from`` it. ``InternalClientError`` is in the tuple because asyncpg raises it, not a
connection error, when a connection dies in the middle of its own bookkeeping (found by killing
the server under load: a pool's reset after a statement that had committed).
"""

from __future__ import annotations

from typing import Final

import asyncpg

PG_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)
