"""The engine's state and ``apply``: the one fold used live and on replay.

:func:`apply` is a deterministic function of (state, event): it reads nothing else — no
clock, no configuration — so replaying the log rebuilds exactly the state the engine had.
For speed it mutates ``state`` in place instead of returning a copy; the engine is its only
owner. Entries are frozen records replaced on change, so a result handed to a caller never
changes underneath it.

What the state knows: per-account balances, every live entry whole (holds, charges waiting for
settlement, with their stored responses) with its request key, of every settled entry only a
fixed-size row in :class:`~tollway.core.settled.SettledTable` (its id, hashes of its request key
and account, its state and the sequences of its events: the whole entry and its response are
read back from the log, :mod:`tollway.core.history`), the credit keys, the three system ledger
accounts and a few counters the decisions need in O(1). Hot state is bounded by live work plus
about 80 bytes per entry settled within the retention. The expiry index (a heap) is derived
from the entries and is not part of a snapshot; it drops a settled hold's item once its expiry
passes.

What it deliberately does not know: configuration (the commit event says whether it
finalizes), and anything about Redis or HTTP.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from tollway.core import events as ev
from tollway.core.errors import InvariantViolation, ensure
from tollway.core.lifecycle import ARCHIVABLE, TRANSITIONS, UNSETTLED, EntryKind, EntryState, HoldEnd
from tollway.core.settled import Settled, SettledTable

__all__ = ["Settled", "SettledTable"]  # re-exported: the decisions and the engine name them from here

S = EntryState
_RESERVE: Final = EntryKind.RESERVE  # module constants: an Enum's attribute costs ~0.2 µs on Python 3.11
_SETTLES: Final = frozenset(map(id, ARCHIVABLE))  # by identity: hashing an Enum member runs Python code (~1 µs)
_CHARGE: Final = EntryKind.CHARGE
_IDLE: Final = S.IDLE
_HELD: Final = S.RESERVE_HELD
_COMMITTED: Final = S.COMMITTED
_PENDING: Final = S.FINALIZE_PENDING
_FAILED: Final = S.FINALIZE_FAILED
_VOIDED: Final = S.VOIDED
_LEGAL: Final = frozenset((id(source), id(target)) for source, targets in TRANSITIONS.items() for target in targets)
"""TRANSITIONS as pairs of identities, so checking a move hashes two ints instead of two Enum members."""


class Account(msgspec.Struct, gc=False):
    """Balances of one account, in MicroUSD. Mutable: owned by the state alone."""

    available_micro: int = 0
    held_micro: int = 0
    charged_micro: int = 0  # net revenue taken from this account (charges − voids)
    unsettled_micro: int = 0  # charged but not yet confirmed by settlement

    def copy(self) -> Account:
        """A detached copy (accounts are mutated in place by the fold)."""
        return Account(self.available_micro, self.held_micro, self.charged_micro, self.unsettled_micro)


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One billing entry (a hold and what became of it, or a direct charge)."""

    billing_entry_id: str
    account_id: str
    request_id: str
    kind: EntryKind
    state: EntryState
    estimated_cost_micro: int
    actual_cost_micro: int | None
    charged_micro: int
    uncollected_micro: int
    expires_at_ms: int | None
    rate: ev.RateSnapshot
    correlation_id: str
    created_at_ms: int
    updated_at_ms: int
    wal_sequence: int  # the last event that changed this entry
    fingerprint: str
    reason: str | None = None  # release or void reason; finalize failure reason
    failed_at_ms: int | None = None  # when it entered FINALIZE_FAILED
    # The sequences of the events that made it (its creation, its last extension, its commit, ...; a stored
    # response is the event right after the commit): what reads it back from the log once it settles. Empty
    # in entries from snapshots written before settled entries left memory: those stay whole until archived.
    event_seqs: tuple[int, ...] = ()


class LegacySettled(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A settled entry's record in snapshots written before the packed table; converted when loaded."""

    request_key: str
    state: EntryState
    charged_micro: int
    packed: bytes  # updated_at_ms and the event sequences: pack_seqs


_TIME_BYTES: Final = 6  # milliseconds since the epoch fit 48 bits until the year 10889


def pack_seqs(updated_at_ms: int, seqs: tuple[int, ...]) -> bytes:
    """``updated_at_ms`` (6 bytes) and ascending ``seqs`` as LEB128 varints: the first, then each one's distance.

    About 12 bytes for an entry's usual three or four events: a bytes object, not a tuple of ints.
    """
    out = bytearray(updated_at_ms.to_bytes(_TIME_BYTES, "big"))  # OverflowError past 48 bits
    previous = 0
    for seq in seqs:  # ascending: the fold appends each entry's events in order
        value = seq - previous
        previous = seq
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def packed_time(packed: bytes) -> int:
    """The ``updated_at_ms`` of :func:`pack_seqs`."""
    return int.from_bytes(packed[:_TIME_BYTES], "big")


def unpack_seqs(packed: bytes) -> tuple[int, tuple[int, ...]]:
    """``(updated_at_ms, seqs)`` of :func:`pack_seqs`."""
    seqs: list[int] = []
    value = shift = previous = 0
    for byte in packed[_TIME_BYTES:]:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            previous += value
            seqs.append(previous)
            value = shift = 0
    return packed_time(packed), tuple(seqs)


class CreditRecord(msgspec.Struct, frozen=True, gc=False):
    """An idempotency record of a mint, deduct or credit note (kept for the entry retention)."""

    credit_event_id: str
    account_id: str
    kind: str
    amount_micro: int
    fingerprint: str
    wal_sequence: int
    timestamp_ms: int


class StoredState(msgspec.Struct):
    """The state's stored fields: the one list that :class:`State` holds and a :class:`Snapshot` copies.

    Their names and order are the snapshot file's body (a msgpack map, :mod:`tollway.wal.snapshot`):
    a new field goes at the end, with a default for the snapshots written before it.
    """

    last_sequence: int = 0
    accounts: dict[str, Account] = {}
    entries: dict[str, Entry] = {}
    requests: dict[str, str] = {}  # request key → the entry it created
    credits: dict[str, CreditRecord] = {}  # credit key → its idempotency record
    responses: dict[str, str] = {}  # entry id → the stored response of its commit
    escalations: dict[str, int] = {}  # FINALIZE_FAILED entry id → when its escalation alert fired
    revenue_micro: int = 0
    funding_micro: int = 0
    credit_notes_micro: int = 0
    # What archived entries leave behind (snapshots from before retention lack these: zeros).
    archived_charged: dict[str, int] = {}  # account → net charges of its archived entries
    archived_uncollected_micro: int = 0
    archived_entries: int = 0
    archived_before_ms: int = 0  # the newest archiver cutoff: only entries created before it may be gone
    # Settled entries' records in snapshots written before the packed table (read, converted, written empty).
    legacy_settled: dict[str, LegacySettled] = msgspec.field(default_factory=dict, name="settled")
    # Settled entries' records: SettledTable.to_bytes(), in the order of their last change (oldest first).
    # What they charged is in archived_charged, what they left uncollected in archived_uncollected_micro.
    # A view: decoding a snapshot does not copy the table's bytes out of the file's (msgspec decodes in place).
    settled_rows: memoryview = memoryview(b"")


STORED_FIELDS: Final = StoredState.__struct_fields__
_TABLE_FIELDS: Final = ("legacy_settled", "settled_rows")
_PLAIN_FIELDS: Final = tuple(name for name in STORED_FIELDS if name not in _TABLE_FIELDS)


class Snapshot(StoredState):
    """Everything :class:`State` holds except derived indexes; what a snapshot file stores. Never changed once made."""


def _copied(value: Any) -> Any:
    """A new dict with the same items; anything else (numbers) as it is."""
    return dict(value) if isinstance(value, dict) else value


class Transition(msgspec.Struct, frozen=True, gc=False):
    """What an event did to an entry, for observers."""

    entry: Entry
    from_state: EntryState
    to_state: EntryState


def request_key(account_id: str, request_id: str) -> str:
    """The idempotency key of a request; neither part may contain a space."""
    return f"{account_id} {request_id}"


def split_request_key(key: str) -> tuple[str, str]:
    """``(account_id, request_id)`` of a key made by :func:`request_key`."""
    account_id, _, request_id = key.partition(" ")
    return account_id, request_id


if TYPE_CHECKING:  # the type checker sees StoredState's typed fields on State ...
    _Stored = StoredState
else:  # ... while at run time State is a plain slotted class: a Struct's attributes are slower to use

    class _Stored:
        __slots__ = ()


class State(_Stored):
    """The authoritative state: a fold of the WAL. Its stored fields are :class:`StoredState`'s."""

    __slots__ = (
        *_PLAIN_FIELDS,
        "_expiry_heap",
        "finalize_failed_count",
        "finalize_pending_count",
        "held_count",
        "settled",
    )

    def __init__(self) -> None:
        empty = StoredState()  # fresh defaults (new dicts) for every stored field
        for name in _PLAIN_FIELDS:
            setattr(self, name, getattr(empty, name))
        self.settled = SettledTable()  # stored as settled_rows
        # Derived from the entries, never stored: rebuilt by from_snapshot, kept by the fold.
        self.finalize_failed_count = 0
        self.finalize_pending_count = 0
        self.held_count = 0
        self._expiry_heap: list[tuple[int, str]] = []  # (expires_at_ms, entry id) of holds, stale ones too

    # -- snapshots -------------------------------------------------------------------------

    def to_snapshot(self) -> Snapshot:
        """The state as a record (shares the dicts: encode it before applying more events)."""
        fields: dict[str, Any] = {name: getattr(self, name) for name in _PLAIN_FIELDS}
        return Snapshot(**fields, settled_rows=memoryview(self.settled.to_bytes()))

    def freeze(self) -> Snapshot:
        """A consistent copy that later events do not change: new dicts, copied accounts.

        Entries, credits and the rest are immutable records, so copying the dicts that hold
        them is enough; accounts are mutable and are copied one by one. Costs a few
        milliseconds per hundred thousand entries, against hundreds for encoding in one go.
        """
        fields: dict[str, Any] = {name: _copied(getattr(self, name)) for name in _PLAIN_FIELDS}
        fields["accounts"] = {name: account.copy() for name, account in self.accounts.items()}
        return Snapshot(**fields, settled_rows=memoryview(self.settled.to_bytes()))

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> State:
        """Rebuild a state, its counters and its expiry index from a snapshot."""
        state = cls()
        for name in _PLAIN_FIELDS:
            setattr(state, name, _copied(getattr(snap, name)))
        state.settled = SettledTable.from_bytes(snap.settled_rows)
        for entry_id, record in snap.legacy_settled.items():  # a snapshot from before the packed table
            account_id, request_id = split_request_key(record.request_key)
            if state.requests.get(record.request_key) == entry_id:
                del state.requests[record.request_key]
            updated_at_ms, seqs = unpack_seqs(record.packed)
            state.settled.add(
                entry_id,
                account_id,
                request_id,
                state=record.state,
                charged_micro=record.charged_micro,
                updated_at_ms=updated_at_ms,
                seqs=seqs,
            )
        for entry in state.entries.values():
            state._count(entry.state, +1)
            if entry.state is S.RESERVE_HELD and entry.expires_at_ms is not None:
                state._expiry_heap.append((entry.expires_at_ms, entry.billing_entry_id))
        heapq.heapify(state._expiry_heap)
        return state

    # -- queries ---------------------------------------------------------------------------

    def account(self, account_id: str) -> Account:
        """The account's balances; an unknown account has all zeros (and is not created)."""
        return self.accounts.get(account_id) or Account()

    def due_holds(self, now_ms: int, limit: int) -> list[str]:
        """Entry ids of held entries due to expire, in (expires_at, entry id) order.

        Only stale items leave the expiry index here (committed, released or extended since);
        a due hold stays in it until its expiry is applied, so one whose ``Expire`` is refused
        (the clock stepped back between this call and the command) is found again next time.
        """
        heap, due = self._expiry_heap, list[tuple[int, str]]()
        while heap and len(due) < limit:
            expires_at_ms, entry_id = heap[0]
            entry = self.entries.get(entry_id)
            if entry is None or entry.state is not S.RESERVE_HELD or entry.expires_at_ms != expires_at_ms:
                heapq.heappop(heap)  # stale
                continue
            if expires_at_ms > now_ms:
                break
            due.append(heapq.heappop(heap))
        for item in due:
            heapq.heappush(heap, item)
        return [entry_id for _, entry_id in due]

    def archivable(self, older_than_ms: int, limit: int) -> list[ev.ArchivedEntry]:
        """Up to ``limit`` settled entries whose last change is before ``older_than_ms``, as archive items.

        Whole entries first (settled ones from an older snapshot), then idempotency records;
        oldest first. Entries are kept in creation order, records in the order of their last
        change, so each scan stops at the first one at or after the cutoff: it reads only the
        old entries that must stay (live holds, unsettled charges) and the ones it returns.
        """
        found: list[ev.ArchivedEntry] = []
        for entry in self.entries.values():
            if entry.created_at_ms >= older_than_ms or len(found) >= limit:
                break
            if entry.state in ARCHIVABLE and entry.updated_at_ms < older_than_ms:
                found.append(
                    ev.ArchivedEntry(entry.billing_entry_id, entry.account_id, entry.request_id, entry.state.value)
                )
        for record in self.settled.records():  # account and request ids are not in memory: the archive names neither
            if len(found) >= limit or record.updated_at_ms >= older_than_ms:
                break
            found.append(ev.ArchivedEntry(record.billing_entry_id, "", "", record.state.value))
        return found

    def archivable_credits(self, older_than_ms: int, limit: int) -> list[tuple[str, CreditRecord]]:
        """Up to ``limit`` credit idempotency records (key, record) made before ``older_than_ms``.

        Oldest first: records are kept in the order their events were written, so the scan stops
        at the first one at or after the cutoff.
        """
        found: list[tuple[str, CreditRecord]] = []
        for key, record in self.credits.items():
            if record.timestamp_ms >= older_than_ms or len(found) >= limit:
                break
            found.append((key, record))
        return found

    def entry_state(self, billing_entry_id: str) -> EntryState | None:
        """The lifecycle state of an entry, whole or settled; None when unknown (never made, or archived)."""
        entry = self.entries.get(billing_entry_id)
        if entry is not None:
            return entry.state
        record = self.settled.get(billing_entry_id)
        return None if record is None else record.state

    def state_counts(self) -> dict[EntryState, int]:
        """How many entries (whole or settled, not archived) are in each state."""
        counts = self.settled.state_counts()
        for entry in self.entries.values():
            counts[entry.state] = counts.get(entry.state, 0) + 1
        return counts

    def iter_entries(self, account_id: str | None = None) -> Iterator[Entry]:
        """Whole entries (live; settled ones only from an older snapshot) in id order, optionally of one account."""
        for entry_id in sorted(self.entries):
            entry = self.entries[entry_id]
            if account_id is None or entry.account_id == account_id:
                yield entry

    # -- the fold --------------------------------------------------------------------------

    def apply(self, event: ev.Event) -> Transition | None:
        """Apply one event. The only way the state changes."""
        if event.wal_sequence != self.last_sequence + 1:  # inline ensure(): the hottest line of replay
            raise InvariantViolation(f"sequence gap: {self.last_sequence} then {event.wal_sequence}")
        self.last_sequence = event.wal_sequence
        payload = event.payload
        handler = _HANDLERS.get(type(payload))
        return None if handler is None else handler(self, event, payload)

    def _count(self, state: EntryState, delta: int) -> None:
        if state is _HELD:
            self.held_count += delta
        elif state is _PENDING:
            self.finalize_pending_count += delta
        elif state is _FAILED:
            self.finalize_failed_count += delta

    def _move(self, new: Entry, old_state: EntryState) -> Transition:
        """Store ``new`` (or, once it settled, its idempotency record) and keep the counters."""
        new_state = new.state
        settles = id(new_state) in _SETTLES
        if settles and new.event_seqs:
            self._settle(new)
        else:
            self.entries[new.billing_entry_id] = new
        if old_state is _HELD:  # the usual move: a hold committed or released (the counter inlined)
            self.held_count -= 1
        elif old_state is not _IDLE:
            self._count(old_state, -1)
        if new_state is _HELD:  # a new hold (the counter inlined)
            self.held_count += 1
        elif not settles:  # no counter counts a settled state
            self._count(new_state, +1)
        return Transition(new, old_state, new_state)

    def _settle(self, entry: Entry) -> None:
        """Keep only the packed record of an entry that just settled; its sums go to the archived totals.

        Its request key leaves :attr:`requests`: the record keeps a hash of it.
        """
        entry_id = entry.billing_entry_id
        self.entries.pop(entry_id, None)
        self.responses.pop(entry_id, None)  # read back from the log: its sequence is among event_seqs
        key = request_key(entry.account_id, entry.request_id)
        if self.requests.get(key) == entry_id:
            del self.requests[key]
        charged = entry.charged_micro if entry.state is _COMMITTED else 0
        self.settled.add(
            entry_id,
            entry.account_id,
            entry.request_id,
            state=entry.state,
            charged_micro=charged,
            updated_at_ms=entry.updated_at_ms,
            seqs=entry.event_seqs,
        )
        if entry.state is not _VOIDED:
            self.archived_charged[entry.account_id] = (
                self.archived_charged.get(entry.account_id, 0) + entry.charged_micro
            )
        self.archived_uncollected_micro += entry.uncollected_micro

    def _acct(self, account_id: str) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = Account()
        return account

    def _existing(self, event: ev.Event, target: EntryState | None) -> Entry:
        """The entry ``event`` moves to ``target`` (None: stays put), checked before any change."""
        entry = self.entries.get(event.billing_entry_id)
        if entry is None:
            raise InvariantViolation(f"{event.event_type} for unknown entry {event.billing_entry_id}")
        if target is not None and (id(entry.state), id(target)) not in _LEGAL:
            raise InvariantViolation(f"illegal transition {entry.state.value} -> {target.value}")
        return entry


def new_entry(event: ev.Event) -> Entry:
    """The entry a reserve or a direct charge creates: a pure function of the event.

    Positional (a comment names each argument whose value does not): the hottest record of the fold, and msgspec takes
    keyword arguments at about 1 µs more per entry (16 fields).
    """
    p = event.payload
    if isinstance(p, ev.BillingReserve):
        return Entry(
            event.billing_entry_id,
            p.account_id,
            p.request_id,
            _RESERVE,  # kind
            _HELD,  # state
            p.estimated_cost_micro,
            None,  # actual_cost_micro
            0,  # charged_micro
            0,  # uncollected_micro
            p.expires_at_ms,
            p.rate,
            event.correlation_id,
            event.timestamp_ms,  # created_at_ms
            event.timestamp_ms,  # updated_at_ms
            event.wal_sequence,
            p.fingerprint,
            None,  # reason
            None,  # failed_at_ms
            (event.wal_sequence,),  # event_seqs
        )
    if isinstance(p, ev.BillingCharge):
        return Entry(
            event.billing_entry_id,
            p.account_id,
            p.request_id,
            _CHARGE,  # kind
            _PENDING if p.finalize else _COMMITTED,  # state
            0,  # estimated_cost_micro
            p.requested_micro,  # actual_cost_micro
            p.charged_micro,
            p.requested_micro - p.charged_micro,  # uncollected_micro
            None,  # expires_at_ms
            p.rate,
            event.correlation_id,
            event.timestamp_ms,  # created_at_ms
            event.timestamp_ms,  # updated_at_ms
            event.wal_sequence,
            p.fingerprint,
            None,  # reason
            None,  # failed_at_ms
            (event.wal_sequence,),  # event_seqs
        )
    raise InvariantViolation(f"{event.event_type} does not create an entry")


def _seqs(entry: Entry, event: ev.Event) -> tuple[int, ...]:
    """``entry``'s event sequences with ``event``'s added (none for a whole entry from an older snapshot)."""
    return (*entry.event_seqs, event.wal_sequence) if entry.event_seqs else ()


def _reserve(state: State, event: ev.Event, p: ev.BillingReserve) -> Transition:
    if event.billing_entry_id in state.entries:  # ensure(), inlined on the hot path
        raise InvariantViolation(f"duplicate entry {event.billing_entry_id}")
    account = state.accounts.get(p.account_id) or state._acct(p.account_id)  # _acct's call only for a new account
    if account.available_micro < p.estimated_cost_micro:
        raise InvariantViolation(f"reserve overdraws {p.account_id}")
    account.available_micro -= p.estimated_cost_micro
    account.held_micro += p.estimated_cost_micro
    state.requests[request_key(p.account_id, p.request_id)] = event.billing_entry_id
    heapq.heappush(state._expiry_heap, (p.expires_at_ms, event.billing_entry_id))
    entry = new_entry(event)
    return state._move(entry, _IDLE)


def _commit(state: State, event: ev.Event, p: ev.BillingCommit) -> Transition:
    target = _PENDING if p.finalize else _COMMITTED
    entry = state._existing(event, target)
    account = state.accounts.get(p.account_id) or state._acct(p.account_id)
    refund = p.estimated_cost_micro - p.charged_micro  # negative when an overrun is debited
    if account.held_micro < p.estimated_cost_micro or account.available_micro + refund < 0:  # ensure(), inlined
        raise InvariantViolation(f"commit of {event.billing_entry_id} overdraws {p.account_id}")
    account.held_micro -= p.estimated_cost_micro
    account.available_micro += refund
    account.charged_micro += p.charged_micro
    state.revenue_micro += p.charged_micro
    if p.finalize:
        account.unsettled_micro += p.charged_micro
    new = msgspec.structs.replace(
        entry,
        state=target,
        actual_cost_micro=p.actual_cost_micro,
        charged_micro=p.charged_micro,
        uncollected_micro=p.uncollected_micro,
        updated_at_ms=event.timestamp_ms,
        wal_sequence=event.wal_sequence,
        event_seqs=(*entry.event_seqs, event.wal_sequence) if entry.event_seqs else (),  # _seqs(), inlined
    )
    return state._move(new, entry.state)


def _return_hold(state: State, event: ev.Event, estimate_micro: int, reason: str) -> Transition:
    entry = state._existing(event, S.RELEASED)
    account = state._acct(entry.account_id)
    ensure(account.held_micro >= estimate_micro, "release returns more than %s holds", entry.account_id)
    account.held_micro -= estimate_micro
    account.available_micro += estimate_micro
    new = msgspec.structs.replace(
        entry,
        state=S.RELEASED,
        reason=reason,
        updated_at_ms=event.timestamp_ms,
        wal_sequence=event.wal_sequence,
        event_seqs=_seqs(entry, event),
    )
    return state._move(new, entry.state)


def _release(state: State, event: ev.Event, p: ev.BillingRelease) -> Transition:
    return _return_hold(state, event, p.estimated_cost_micro, p.reason)


def _expire(state: State, event: ev.Event, p: ev.BillingReserveExpired) -> Transition:
    return _return_hold(state, event, p.estimated_cost_micro, HoldEnd.EXPIRED.value)


def _extend(state: State, event: ev.Event, p: ev.BillingReserveExtended) -> Transition:
    entry = state._existing(event, None)
    ensure(entry.state is S.RESERVE_HELD, "extend of %s entry", entry.state)
    # Only the last extension matters to the entry: it replaces an earlier one among the sequences.
    seqs = (entry.event_seqs[0], event.wal_sequence) if entry.event_seqs else ()
    new = msgspec.structs.replace(
        entry,
        expires_at_ms=p.expires_at_ms,
        updated_at_ms=event.timestamp_ms,
        wal_sequence=event.wal_sequence,
        event_seqs=seqs,
    )
    state.entries[new.billing_entry_id] = new
    heapq.heappush(state._expiry_heap, (p.expires_at_ms, new.billing_entry_id))
    return Transition(new, entry.state, entry.state)


def _charge(state: State, event: ev.Event, p: ev.BillingCharge) -> Transition:
    ensure(event.billing_entry_id not in state.entries, "duplicate entry %s", event.billing_entry_id)
    account = state._acct(p.account_id)
    ensure(account.available_micro >= p.charged_micro, "charge overdraws %s", p.account_id)
    account.available_micro -= p.charged_micro
    account.charged_micro += p.charged_micro
    state.revenue_micro += p.charged_micro
    if p.finalize:
        account.unsettled_micro += p.charged_micro
    state.requests[request_key(p.account_id, p.request_id)] = event.billing_entry_id
    entry = new_entry(event)
    return state._move(entry, _IDLE)


def _void(state: State, event: ev.Event, p: ev.BillingVoid) -> Transition | None:
    if event.billing_entry_id not in state.entries and event.billing_entry_id in state.settled:
        _void_settled(state, event, p)
        return None  # no whole entry here: the engine reports the transition from the entry it read back
    entry = state._existing(event, S.VOIDED)
    ensure(entry.state.value == p.from_state, "void from %s recorded as from %s", entry.state, p.from_state)
    account = state._acct(p.account_id)
    account.available_micro += p.charged_micro
    account.charged_micro -= p.charged_micro
    state.revenue_micro -= p.charged_micro
    if entry.state in UNSETTLED:
        account.unsettled_micro -= p.charged_micro
    new = msgspec.structs.replace(
        entry,
        state=S.VOIDED,
        reason=p.reason,
        updated_at_ms=event.timestamp_ms,
        wal_sequence=event.wal_sequence,
        event_seqs=_seqs(entry, event),
    )
    return state._move(new, entry.state)


def _void_settled(state: State, event: ev.Event, p: ev.BillingVoid) -> None:
    """Refund a COMMITTED charge of which only the packed record is in memory."""
    record = state.settled.get(event.billing_entry_id)
    if record is None:
        raise InvariantViolation(f"void of unknown entry {event.billing_entry_id}")
    ensure(record.state is S.COMMITTED, "void of %s entry %s", record.state.value, event.billing_entry_id)
    ensure(p.from_state == record.state.value, "void from %s recorded as from %s", record.state, p.from_state)
    account_id = p.account_id
    ensure(state.settled.matches(record, account_id), "void of %s names another account", event.billing_entry_id)
    account = state._acct(account_id)
    account.available_micro += p.charged_micro
    account.charged_micro -= p.charged_micro
    state.revenue_micro -= p.charged_micro
    # What the entry had charged leaves the sums (as a whole VOIDED entry stops counting): a void that
    # refunded another amount then shows in the conservation checks, as it did with the whole entry.
    state.archived_charged[account_id] -= record.charged_micro
    # To the end: the records stay in the order of their last change.
    state.settled.replace(event.billing_entry_id, S.VOIDED, 0, event.timestamp_ms, event.wal_sequence)


def _finalize_ack(state: State, event: ev.Event, p: ev.BillingFinalizeAck) -> Transition:
    entry = state._existing(event, S.FINALIZE_ACKED)
    ensure(entry.state.value == p.from_state, "ack from %s recorded as from %s", entry.state, p.from_state)
    state._acct(entry.account_id).unsettled_micro -= entry.charged_micro
    new = msgspec.structs.replace(
        entry,
        state=S.FINALIZE_ACKED,
        updated_at_ms=event.timestamp_ms,
        wal_sequence=event.wal_sequence,
        event_seqs=_seqs(entry, event),
    )
    return state._move(new, entry.state)


def _finalize_fail(state: State, event: ev.Event, p: ev.BillingFinalizeFail) -> Transition:
    entry = state._existing(event, S.FINALIZE_FAILED)
    new = msgspec.structs.replace(
        entry,
        state=S.FINALIZE_FAILED,
        reason=p.reason,
        failed_at_ms=event.timestamp_ms,
        updated_at_ms=event.timestamp_ms,
        wal_sequence=event.wal_sequence,
        event_seqs=_seqs(entry, event),
    )
    return state._move(new, entry.state)


def _credit(state: State, event: ev.Event, p: ev.CreditMint | ev.CreditDeduct | ev.X402CreditNote) -> None:
    account = state._acct(p.account_id)
    if isinstance(p, ev.CreditDeduct):
        ensure(account.available_micro >= p.amount_micro, "deduct overdraws %s", p.account_id)
        account.available_micro -= p.amount_micro
        state.funding_micro += p.amount_micro
    else:
        account.available_micro += p.amount_micro
        if isinstance(p, ev.CreditMint):
            state.funding_micro -= p.amount_micro
        else:
            state.credit_notes_micro -= p.amount_micro
    state.credits[request_key(p.account_id, p.credit_id)] = CreditRecord(
        event.billing_entry_id,
        p.account_id,
        p.EVENT_TYPE,
        p.amount_micro,
        credit_fingerprint(
            p.EVENT_TYPE, p.amount_micro, p.paid_micro_usdc if isinstance(p, ev.CreditMint) else None, p.reason
        ),
        event.wal_sequence,
        event.timestamp_ms,
    )


def credit_fingerprint(event_type: str, amount_micro: int, paid_micro_usdc: int | None, reason: str) -> str:
    """What makes two credit requests with one ``credit_id`` the same operation: every field of it."""
    return f"{event_type}:{amount_micro}:{'' if paid_micro_usdc is None else paid_micro_usdc}:{reason}"


ESCALATED: Final = "finalize_escalated"
"""The audit action recording that a dead letter's escalation alert fired (once per entry)."""


def _audit(state: State, event: ev.Event, p: ev.Audit) -> None:
    if p.action == ESCALATED:
        state.escalations[event.billing_entry_id] = event.timestamp_ms


def _request_complete(state: State, event: ev.Event, p: ev.RequestComplete) -> None:
    """Keep a live entry's stored response; a settled entry's stays in the log only.

    A stored response is always the event right after its commit (``decide`` writes them together),
    so reading a settled entry back finds it there without its sequence being kept.
    """
    entry_id = event.billing_entry_id
    if entry_id in state.entries:  # else it settled with the commit before it: its response stays in the log
        state.responses[entry_id] = p.response_json


def _archive(state: State, event: ev.Event, p: ev.EntriesArchived) -> None:  # noqa: ARG001 - the fold signature
    """Forget the listed entries with their idempotency keys and stored responses, and the listed credit records.

    Balances do not change: an archivable entry holds nothing, and its charge stays in its
    account's ``charged_micro``, which the conservation checks now compare with the live
    entries plus ``archived_charged``.
    """
    ensure(len({item.billing_entry_id for item in p.entries}) == len(p.entries), "an archive lists an entry twice")
    for item in p.entries:
        _check_archived(state, item)
    credit_keys = [request_key(item.account_id, item.credit_id) for item in p.credits]
    ensure(len(set(credit_keys)) == len(credit_keys), "an archive lists a credit twice")
    for key, credit in zip(credit_keys, p.credits, strict=True):
        record = state.credits.get(key)
        if record is None:
            raise InvariantViolation(f"archive of unknown credit {credit.credit_id!r} of {credit.account_id}")
        ensure(record.credit_event_id == credit.credit_event_id, "archive record of credit %s does not match", key)
    state.archived_before_ms = max(state.archived_before_ms, p.older_than_ms)
    for key in credit_keys:
        del state.credits[key]
    for item in p.entries:
        if item.billing_entry_id not in state.entries:  # a packed record: its sums went to the archived totals
            state.settled.remove(item.billing_entry_id)
            state.escalations.pop(item.billing_entry_id, None)
            state.archived_entries += 1
            continue
        entry = state.entries.pop(item.billing_entry_id)
        key = request_key(entry.account_id, entry.request_id)
        if state.requests.get(key) == entry.billing_entry_id:
            del state.requests[key]
        state.responses.pop(entry.billing_entry_id, None)
        state.escalations.pop(entry.billing_entry_id, None)
        if entry.state is not S.VOIDED:
            charged = state.archived_charged.get(entry.account_id, 0) + entry.charged_micro
            state.archived_charged[entry.account_id] = charged
        state.archived_uncollected_micro += entry.uncollected_micro
        state.archived_entries += 1


def _check_archived(state: State, item: ev.ArchivedEntry) -> None:
    """``item`` names a settled entry (whole or its record) of the same account, request and state.

    An item made from a packed record names no account or request (memory has only their
    hashes); one from an older log does, and is checked against the hashes.
    """
    entry = state.entries.get(item.billing_entry_id)
    record = state.settled.get(item.billing_entry_id) if entry is None else None
    if entry is not None:
        found = (entry.account_id, entry.request_id, entry.state)
    elif record is not None:
        named = (item.account_id, item.request_id)
        ensure(
            named == ("", "") or state.settled.matches(record, *named),
            "archive record of %s does not match the entry",
            item.billing_entry_id,
        )
        found = (*named, record.state)
    else:
        raise InvariantViolation(f"archive of unknown entry {item.billing_entry_id}")
    ensure(found[2] in ARCHIVABLE, "archive of %s entry %s", found[2].value, item.billing_entry_id)
    ensure(
        (found[0], found[1], found[2].value) == (item.account_id, item.request_id, item.state),
        "archive record of %s does not match the entry",
        item.billing_entry_id,
    )


P = TypeVar("P", bound=ev.Payload)
_Handler = Callable[[State, ev.Event, Any], Transition | None]  # Any: each handler's own payload type, paired below


_HANDLERS: Final[dict[type[ev.Payload], _Handler]] = {}
"""Event types not listed (request_start, reconciliation) change nothing but the sequence."""


def _fold(payload_type: type[P], handler: Callable[[State, ev.Event, P], Transition | None]) -> None:
    """Register ``handler`` for ``payload_type``; the type checker sees that they match."""
    _HANDLERS[payload_type] = handler


_fold(ev.BillingReserve, _reserve)
_fold(ev.BillingCommit, _commit)
_fold(ev.BillingRelease, _release)
_fold(ev.BillingReserveExpired, _expire)
_fold(ev.BillingReserveExtended, _extend)
_fold(ev.BillingCharge, _charge)
_fold(ev.BillingVoid, _void)
_fold(ev.BillingFinalizeAck, _finalize_ack)
_fold(ev.BillingFinalizeFail, _finalize_fail)
_fold(ev.CreditMint, _credit)
_fold(ev.CreditDeduct, _credit)
_fold(ev.X402CreditNote, _credit)
_fold(ev.RequestComplete, _request_complete)
_fold(ev.Audit, _audit)
_fold(ev.EntriesArchived, _archive)
