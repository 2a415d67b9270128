"""Audit sections that reach beyond the files: the Redis projection and the settlement service.

:func:`tollway.audit.audit` proves conservation from the WAL alone. These add two comparisons
to its report, each as a named :class:`~tollway.audit.Section`:

- ``redis`` — the projection equals the WAL fold, field by field, queues included
  (:func:`tollway.redis.parity.differences`). Only comparable when the projection has applied
  exactly the sequence the audit folded; otherwise the section says so and fails, because
  parity was not shown (audit a stopped or idle service).
- ``settlement`` — every ``FINALIZE_ACKED`` entry is finalized at settlement with the same
  amount, nothing settlement finalized is unknown, voided or released here, and charges
  settlement finalized that tollway has not recorded yet are listed (the worker acks them).

Both read only; neither changes anything anywhere.
"""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis

from tollway.audit import AuditReport, Section
from tollway.core.lifecycle import EntryState
from tollway.redis.errors import UNAVAILABLE
from tollway.redis.keys import Keys
from tollway.redis.parity import applied_sequence, differences
from tollway.settlement.client import FinalizedItem, SettlementClient, SettlementUnavailable

LIST_PAGE_MAX: Final = 1000
LIST_ITEMS_MAX: Final = 10_000_000
_CHARGED_STATES: Final = frozenset({EntryState.FINALIZE_PENDING, EntryState.FINALIZE_FAILED, EntryState.FINALIZE_ACKED})


async def redis_section(report: AuditReport, redis_url: str, keys: Keys) -> Section:
    """Compare the projection at ``redis_url`` with the audit's fold of the WAL."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        applied = await applied_sequence(client, keys)
        if applied is None:
            return Section("redis", ("the projection is missing (the service rebuilds it when it starts)",))
        if int(applied) != report.last_sequence:
            problem = (
                f"the projection is at sequence {int(applied)}, the log at {report.last_sequence}: "
                "parity cannot be shown (audit a stopped or idle service)"
            )
            return Section("redis", (problem,))
        problems = await differences(client, keys, report.state)
        return Section("redis", tuple(problems), (f"projection in parity at sequence {report.last_sequence}",))
    except UNAVAILABLE as exc:
        return Section("redis", (f"redis at {redis_url} could not be read: {exc}",))
    finally:
        await client.aclose()


async def settlement_section(report: AuditReport, client: SettlementClient) -> Section:
    """Compare settlement's finalized list with the entries folded from the WAL."""
    try:
        finalized = await _finalized(client)
    except SettlementUnavailable as exc:
        return Section("settlement", (f"settlement's finalized list could not be read: {exc}",))
    entries = report.state.entries
    problems: list[str] = []
    unrecorded: list[str] = []
    archived = 0
    for reservation_id, item in finalized.items():
        entry = entries.get(reservation_id)
        charged = report.archived_acked.get(reservation_id) if entry is None else None
        if charged is not None:  # acknowledged: settled (only its record in memory), or archived past the retention
            archived += report.state.entry_state(reservation_id) is None
            if item.actual_cost_micro != charged:
                problems.append(f"{reservation_id}: settlement has {item.actual_cost_micro}, tollway charged {charged}")
        elif entry is None or entry.state not in _CHARGED_STATES:
            known = report.state.entry_state(reservation_id)
            state = "unknown" if known is None else known.value
            problems.append(f"settlement finalized {reservation_id}, which is {state} here")
        elif item.actual_cost_micro != entry.charged_micro:
            problems.append(
                f"{reservation_id}: settlement has {item.actual_cost_micro}, tollway charged {entry.charged_micro}"
            )
        elif entry.state is not EntryState.FINALIZE_ACKED:
            unrecorded.append(reservation_id)
    problems.extend(
        f"{entry_id} is FINALIZE_ACKED but settlement has no record of it"
        for entry_id in sorted(report.archived_acked)
        if report.state.entry_state(entry_id) is EntryState.FINALIZE_ACKED and entry_id not in finalized
    )
    notes = [f"{len(finalized):,} charge(s) finalized at settlement"]
    if unrecorded:
        notes.append(f"{len(unrecorded)} finalized at settlement but not yet acked here (the worker acks them)")
    if archived:
        notes.append(f"{archived:,} of them acknowledged and since archived here (past the retention)")
    return Section("settlement", tuple(problems), tuple(notes))


async def _finalized(client: SettlementClient) -> dict[str, FinalizedItem]:
    items: dict[str, FinalizedItem] = {}
    cursor: str | None = None
    while len(items) < LIST_ITEMS_MAX:
        page = await client.list_finalized(cursor, LIST_PAGE_MAX)
        items.update((item.reservation_id, item) for item in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return items
