"""A settled entry read back from its events: the entry's half of the fold, without balances. Pure.

Once an entry settles, the state keeps only its idempotency record (:class:`~tollway.core.state.Settled`):
the sequences of the events that made it. :func:`fold_entry` turns those events, read back from
the log, into the very :class:`~tollway.core.state.Entry` the state held when it settled (and
after a later void), with its stored response. It changes the entry exactly as
:mod:`tollway.core.state`'s handlers do (``tests/test_history.py`` and the engine model compare
the two), and knows nothing of accounts, the log or where the events came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from tollway.core import events as ev
from tollway.core.errors import InvariantViolation, ensure
from tollway.core.lifecycle import EntryState, HoldEnd
from tollway.core.state import Entry, State, Transition, new_entry

S = EntryState


def response_after(commit: ev.Event, following: ev.Event | None) -> ev.Event | None:
    """The stored response of ``commit``: the event right after it, when that is its entry's RequestComplete."""
    if following is None or following.billing_entry_id != commit.billing_entry_id:
        return None
    return following if isinstance(following.payload, ev.RequestComplete) else None


def fold_entry(events: Sequence[ev.Event]) -> tuple[Entry, str | None]:
    """The entry (and its stored response) that ``events`` — its creation first, in order — made."""
    ensure(bool(events), "an entry needs at least its creating event")
    entry, response_json = new_entry(events[0]), None
    for event in events[1:]:
        ensure(event.billing_entry_id == entry.billing_entry_id, "event %s is another entry's", event.wal_sequence)
        if isinstance(event.payload, ev.RequestComplete):
            response_json = event.payload.response_json
        else:
            entry = entry_after(entry, event)
    return entry, response_json


def entry_after(entry: Entry, event: ev.Event) -> Entry:
    """``entry`` as ``event`` leaves it (the lifecycle was checked when the event was written)."""
    p = event.payload
    seqs = (*entry.event_seqs, event.wal_sequence)
    common = {"updated_at_ms": event.timestamp_ms, "wal_sequence": event.wal_sequence, "event_seqs": seqs}
    match p:
        case ev.BillingReserveExtended():
            common["event_seqs"] = (entry.event_seqs[0], event.wal_sequence)
            return msgspec.structs.replace(entry, expires_at_ms=p.expires_at_ms, **common)
        case ev.BillingCommit():
            state = S.FINALIZE_PENDING if p.finalize else S.COMMITTED
            return msgspec.structs.replace(
                entry,
                state=state,
                actual_cost_micro=p.actual_cost_micro,
                charged_micro=p.charged_micro,
                uncollected_micro=p.uncollected_micro,
                **common,
            )
        case ev.BillingRelease():
            return msgspec.structs.replace(entry, state=S.RELEASED, reason=p.reason, **common)
        case ev.BillingReserveExpired():
            expired = HoldEnd.EXPIRED.value
            return msgspec.structs.replace(entry, state=S.RELEASED, reason=expired, **common)
        case ev.BillingVoid():
            return msgspec.structs.replace(entry, state=S.VOIDED, reason=p.reason, **common)
        case ev.BillingFinalizeAck():
            return msgspec.structs.replace(entry, state=S.FINALIZE_ACKED, **common)
        case ev.BillingFinalizeFail():
            failed = {"reason": p.reason, "failed_at_ms": event.timestamp_ms}
            return msgspec.structs.replace(entry, state=S.FINALIZE_FAILED, **failed, **common)
    raise InvariantViolation(f"{event.event_type} does not change an entry")


def apply_answering(
    state: State, event: ev.Event, read_back: Entry | None, entry: Entry | None
) -> tuple[Transition | None, Entry | None]:
    """Apply ``event`` to ``state``: its transition, and the entry the command's answer shows so far.

    The engine's write path, shared with the in-memory engine of the tests: ``entry`` follows
    the write's events even once the entry settled and only its record is in the state. A void
    of a settled charge changes only the record; its transition is made from ``read_back``, the
    entry read back from the log for the command.
    """
    change = state.apply(event)
    if change is None and read_back is not None and isinstance(event.payload, ev.BillingVoid):
        voided = entry_after(read_back, event)
        change = Transition(voided, read_back.state, voided.state)
    if change is not None:
        return change, change.entry
    return None, entry
