"""What asyncpg raises when PostgreSQL cannot be used: one tuple for every boundary of this package.

Each module of :mod:`tollway.pg` catches :data:`PG_ERRORS` around its statements and raises
:class:`~tollway.core.errors.LogUnavailable` (or a more precise error of the tollway tree)
``from`` it. ``InternalClientError`` is in the tuple because asyncpg raises it, not a
connection error, when a connection dies in the middle of its own bookkeeping (found by killing
the server under load: a pool's reset after a statement that had committed).

:func:`outcome_unknown` tells an error after which a write may or may not have committed (the
connection, not the statement, failed) from one where PostgreSQL refused the statement, which
rolled it back.
"""

from __future__ import annotations

from typing import Final

import asyncpg

PG_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


_CONNECTION_CLASSES: Final = ("08", "57")  # connection exception; operator intervention (shutdown, crash)


def outcome_unknown(exc: BaseException) -> bool:
    """Whether a write that raised ``exc`` may have committed anyway.

    True for everything but an error PostgreSQL answered about the statement itself (a
    constraint, a read-only server, ...), which rolled it back: a lost connection, a timeout, a
    server shutting down (which may end a backend after its commit, while it waits for a
    synchronous standby).
    """
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _CONNECTION_CLASSES
    return True
