"""Projection parity: whether Redis says exactly what the WAL fold says.

:func:`differences` reads the whole projection of one shard and compares it with a state
(the engine's, or an auditor's independent fold of the WAL): every account's balances, the
system ledger, the hash of every live entry (and no other: settled entries are not in Redis),
the expiry index, counters, and both queues — each ``FINALIZE_PENDING`` entry is waiting in
the finalize stream or the delayed-retry set, each ``FINALIZE_FAILED`` one has exactly one
dead letter, and nothing else is queued. An empty list means parity. It reads with SCAN and
pipelines and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import msgspec
import redis.asyncio as aioredis

from tollway.core.ids import ulid_floor
from tollway.core.lifecycle import EntryState
from tollway.core.state import State
from tollway.redis.errors import at_boundary
from tollway.redis.keys import Keys
from tollway.redis.projection import (
    AVAILABLE,
    CHARGED,
    CREDIT_NOTES,
    FUNDING,
    HELD,
    REVENUE,
    UNSETTLED,
    entry_fields,
    is_live,
)

PROBLEMS_MAX: Final = 50
_PAGE: Final = 1000


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(raw: object) -> dict[str, str]:
    """A reply of HGETALL (or stream fields) with text keys and values."""
    return {_text(k): _text(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _stream_ids(reply: object) -> list[str]:
    """The billing_entry_id field of every message of an XRANGE reply."""
    return [_hash(fields).get("billing_entry_id", "") for _, fields in reply or []]  # type: ignore[attr-defined]


async def _hashes(client: aioredis.Redis, keys: Iterable[str]) -> list[dict[str, str]]:
    names = list(keys)
    out: list[dict[str, str]] = []
    for start in range(0, len(names), _PAGE):
        pipe = client.pipeline(transaction=False)
        for name in names[start : start + _PAGE]:
            pipe.hgetall(name)
        out.extend(_hash(raw) for raw in await pipe.execute())
    return out


async def _count_keys(client: aioredis.Redis, pattern: str) -> int:
    return sum([1 async for _ in client.scan_iter(match=pattern, count=_PAGE)])


@at_boundary
async def applied_sequence(client: aioredis.Redis, keys: Keys) -> int | None:
    """The sequence the projection under ``keys`` has applied (None: there is none)."""
    applied = await client.hget(keys.meta, "applied_seq")
    return None if applied is None else int(applied)


@at_boundary
async def differences(client: aioredis.Redis, keys: Keys, state: State) -> list[str]:
    """Every way the shard's projection differs from ``state`` (at most PROBLEMS_MAX)."""
    problems: list[str] = []
    problems += await _balances(client, keys, state)
    problems += await _entries(client, keys, state)
    problems += await _queues(client, keys, state)
    return problems[:PROBLEMS_MAX]


async def _balances(client: aioredis.Redis, keys: Keys, state: State) -> list[str]:
    problems = []
    ids = sorted(state.accounts)
    for account_id, stored in zip(ids, await _hashes(client, map(keys.account, ids)), strict=True):
        account = state.accounts[account_id]
        expected = {
            AVAILABLE: account.available_micro,
            HELD: account.held_micro,
            CHARGED: account.charged_micro,
            UNSETTLED: account.unsettled_micro,
        }
        for name, value in expected.items():
            if int(stored.get(name, "0")) != value:
                problems.append(f"account {account_id} {name}: redis {stored.get(name, '0')}, WAL {value}")
    ledger = _hash(await client.hgetall(keys.ledger))
    for name, value in (
        (REVENUE, state.revenue_micro),
        (FUNDING, state.funding_micro),
        (CREDIT_NOTES, state.credit_notes_micro),
    ):
        if int(ledger.get(name, "0")) != value:
            problems.append(f"ledger {name}: redis {ledger.get(name, '0')}, WAL {value}")
    return problems


async def _entries(client: aioredis.Redis, keys: Keys, state: State) -> list[str]:
    problems = []
    ids = sorted(entry_id for entry_id, entry in state.entries.items() if is_live(entry))
    for entry_id, stored in zip(ids, await _hashes(client, map(keys.entry, ids)), strict=True):
        stored.pop("poison_id", None)
        expected = entry_fields(state.entries[entry_id])
        if stored != expected:
            fields = sorted(name for name in expected.keys() | stored.keys() if expected.get(name) != stored.get(name))
            problems.append(f"entry {entry_id} differs in {', '.join(fields)}")
    found = await _count_keys(client, keys.entry("*").replace("{", "\\{").replace("}", "\\}"))
    if found != len(ids):
        problems.append(f"redis has {found} entry hashes, the WAL {len(ids)} live entries")
    held = {e.billing_entry_id: e.expires_at_ms for e in state.entries.values() if e.state is EntryState.RESERVE_HELD}
    scored: list[tuple[bytes, float]] = await client.zrange(keys.expiry, 0, -1, withscores=True)  # type: ignore[assignment]
    index = {_text(member): int(score) for member, score in scored}
    if index != held:
        problems.append(f"expiry index has {len(index)} holds, the WAL {len(held)} (or their times differ)")
    counts = {entry_state.value: count for entry_state, count in state.state_counts().items()}
    stored_counts = {k: int(v) for k, v in _hash(await client.hgetall(keys.counters)).items() if int(v)}
    if stored_counts != counts:
        problems.append(f"counters: redis {stored_counts}, WAL {counts}")
    return problems


async def _queues(client: aioredis.Redis, keys: Keys, state: State) -> list[str]:
    pending = {e.billing_entry_id for e in state.entries.values() if e.state is EntryState.FINALIZE_PENDING}
    failed = {e.billing_entry_id for e in state.entries.values() if e.state is EntryState.FINALIZE_FAILED}
    queued = _stream_ids(await client.xrange(keys.finalize))
    delayed = [msgspec.json.decode(_text(m))["billing_entry_id"] for m in await client.zrange(keys.delayed, 0, -1)]
    letters = _stream_ids(await client.xrange(keys.poison))
    problems = []
    waiting = queued + delayed
    # A message whose entry has left FINALIZE_PENDING is stale: the outcome is in the WAL and the
    # worker finishes such a message without calling settlement. So is one whose entry was since
    # archived (the worker drops messages of entries it does not know): an id the state lacks but
    # made before the archiver's newest cutoff. Only an unknown entry newer than that is wrong.
    floor = ulid_floor(state.archived_before_ms) if state.archived_before_ms else ""
    settled = {entry_id for entry_id in state.entries if entry_id not in pending}
    settled |= {entry_id for entry_id in waiting if entry_id in state.settled}
    settled |= {entry_id for entry_id in waiting if entry_id < floor and entry_id not in state.entries}
    if len(waiting) != len(set(waiting)):
        problems.append("an entry is queued for finalize more than once")
    if set(waiting) - settled != pending:
        missing, extra = sorted(pending - set(waiting)), sorted(set(waiting) - pending - settled)
        problems.append(
            f"finalize queue: {len(missing)} pending entries not queued {missing[:3]}, {len(extra)} extra {extra[:3]}"
        )
    if len(letters) != len(set(letters)) or set(letters) != failed:
        problems.append(f"poison stream has {len(letters)} letters for {len(failed)} failed entries")
    return problems
