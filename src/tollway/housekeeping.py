"""Housekeeping beside the engine: the expiry sweeper and the archiver.

Both only submit commands (:class:`~tollway.core.commands.Expire`,
:class:`~tollway.core.commands.Archive`) through :meth:`Engine.execute
<tollway.engine.Engine.execute>`, like any caller, so the engine decides and logs them as it does
everything else; billing gets in between their commands. :class:`~tollway.service.Service`
runs :func:`run_sweeper` and :func:`run_archiver` as background tasks; tests and tools call
:func:`sweep_once` and :func:`archive_once` directly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, NamedTuple

from tollway.core import commands as cmd
from tollway.engine import Engine

log = logging.getLogger("tollway.engine")

ARCHIVE_BATCH: Final = 500
"""Entries and credit records one ``entries_archived`` event lists, at most (a record of about 65 KB)."""


class Archived(NamedTuple):
    """What :func:`archive_once` dropped: settled entries and credit idempotency records."""

    entries: int = 0
    credits: int = 0


async def sweep_once(engine: Engine) -> int:
    """Expire due holds, at most ``sweep_batch_max``; returns how many were expired."""
    engine.check_running()
    due = engine.state.due_holds(engine.now_ms(), engine.settings.sweep_batch_max)
    if not due:
        return 0
    results = await asyncio.gather(*(engine.execute(cmd.Expire(entry_id)) for entry_id in due))
    return sum(1 for result in results if isinstance(result, cmd.EntryResult))


async def archive_once(engine: Engine) -> Archived:
    """Archive what is past the retention, at most :data:`ARCHIVE_BATCH` records per event.

    Settled entries' idempotency records (with their request keys) and the idempotency
    records of credits, oldest first. Runs until none is left, one event at a time, so billing
    gets in between. Returns zeros when retention is off (``entry_retention_hours`` 0).
    """
    retention_ms = engine.settings.entry_retention_hours * 3_600_000
    if retention_ms == 0:
        return Archived()
    cutoff_ms = engine.now_ms() - retention_ms
    if not engine.state.archivable(cutoff_ms, 1) and not engine.state.archivable_credits(cutoff_ms, 1):
        return Archived()  # the usual answer: no command written, no refusal counted
    entries = credit_records = 0
    while True:
        result = await engine.execute(cmd.Archive(engine.now_ms() - retention_ms, ARCHIVE_BATCH))
        if not isinstance(result, cmd.ArchiveResult):  # exactly a full batch was left: nothing more
            return Archived(entries, credit_records)
        entries += result.archived
        credit_records += result.credits
        if result.archived + result.credits < ARCHIVE_BATCH:
            return Archived(entries, credit_records)


async def run_archiver(engine: Engine) -> None:
    """Archive forever, every ``archive_interval_s``; cancel the task to stop it."""
    while True:
        archived = await archive_once(engine)
        if any(archived):
            log.info(
                "archived %d entries and %d credit records past the %d h retention",
                archived.entries,
                archived.credits,
                engine.settings.entry_retention_hours,
            )
        await asyncio.sleep(engine.settings.archive_interval_s)


async def run_sweeper(engine: Engine) -> None:
    """Sweep forever, every ``sweep_interval_ms``; cancel the task to stop it."""
    while True:
        expired = await sweep_once(engine)
        # A full tick means a backlog: go again at once (callers still get in between).
        pause_s = 0 if expired >= engine.settings.sweep_batch_max else engine.settings.sweep_interval_ms / 1000
        await asyncio.sleep(pause_s)
