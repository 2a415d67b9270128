"""What each WAL event does to the Redis projection: pure functions, no Redis.

:func:`event_ops` turns one event into primitive operations (the opcodes of
``lua/apply_batch.lua``); :func:`encode_batch` packs many events' operations into the
script's KEYS and ARGV. The operations are derived from the event alone — its payload
carries every amount and the state it leaves — so the projector can apply events it reads
back from the WAL long after the engine has moved on.

The projection holds **live work only**, so Redis is bounded by what is in flight, not by
history: balances, the system ledger, counts per state, the hash of every live entry
(``RESERVE_HELD``, ``FINALIZE_PENDING``, ``FINALIZE_FAILED``), the expiry index and the
finalize queues. An entry that settles (``COMMITTED``, ``FINALIZE_ACKED``, ``RELEASED``,
``VOIDED``) leaves Redis in the same batch (its hash is deleted: a hold committed within one
batch is never written at all); stored responses are not projected. History is read from the
engine and the log. Archived entries (``entries_archived``) only decrement their counts.

:func:`rebuild_commands` describes the whole projection of a state (balances, entries, the
expiry index, stored responses, and both finalize queues) for a rebuild after Redis lost it.

Amounts are written as canonical decimal strings; balances change only by HINCRBY deltas.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgspec

from tollway.core import events as ev
from tollway.core.lifecycle import ARCHIVABLE, EntryState
from tollway.core.state import Entry, State, new_entry
from tollway.redis.keys import Keys

S = EntryState
Op = list[str | int]
"""An opcode followed by its arguments; key arguments are key *names* until encoded (then indexes)."""

OP_CHECKED: Final = "I"  # HINCRBY of a user balance checked at its low point (apply_batch.lua's header)
OP_DELTA: Final = "C"  # HINCRBY that may go negative (the system ledger)
OP_COUNTS: Final = "N"  # counts per state
OP_HSET: Final = "H"
OP_ZADD: Final = "Z"
OP_ZREM: Final = "R"
OP_SET: Final = "S"
OP_XADD: Final = "X"
OP_POISON: Final = "P"  # XADD a dead letter, then HSET the entry's poison_id
OP_UNPOISON: Final = "Q"  # XDEL the entry's dead letter, then HDEL its poison_id
OP_DEL: Final = "D"
OPCODES: Final = frozenset(
    {OP_CHECKED, OP_DELTA, OP_COUNTS, OP_HSET, OP_ZADD, OP_ZREM, OP_SET, OP_XADD, OP_POISON, OP_UNPOISON, OP_DEL}
)
"""Every opcode ``apply_batch.lua`` runs; its header documents each (a test holds the two together)."""

_FIRST: Final[tuple[int, ...]] = (1,)
_KEYS_AT: Final[dict[str | int, tuple[int, ...]]] = {OP_POISON: (1, 2), OP_UNPOISON: (1, 2)}
"""Where an op's key arguments are: the first two for these opcodes, the first (:data:`_FIRST`) for every other."""

AVAILABLE, HELD, CHARGED, UNSETTLED = "available", "held", "charged", "unsettled"
_STATE: Final = {state: state.value for state in EntryState}
"""Each state's name as stored (a dict lookup costs less than the enum's ``value`` property)."""
REVENUE, FUNDING, CREDIT_NOTES = "revenue", "funding", "credit_notes"


def entry_items(entry: Entry) -> list[str]:
    """An entry as the flat string hash stored at ``entry:<id>``: field, value, field, value, …."""
    rate = entry.rate
    return [
        "billing_entry_id",
        entry.billing_entry_id,
        "account_id",
        entry.account_id,
        "request_id",
        entry.request_id,
        "kind",
        entry.kind,
        "state",
        _STATE[entry.state],
        "estimated_cost_micro",
        str(entry.estimated_cost_micro),
        "actual_cost_micro",
        "" if entry.actual_cost_micro is None else str(entry.actual_cost_micro),
        "charged_micro",
        str(entry.charged_micro),
        "uncollected_micro",
        str(entry.uncollected_micro),
        "expires_at_ms",
        "" if entry.expires_at_ms is None else str(entry.expires_at_ms),
        "credit_units_per_usd",
        str(rate.credit_units_per_usd),
        "usd_usdc_rate_ppm",
        str(rate.usd_usdc_rate_ppm),
        "rate_frozen_at_ms",
        str(rate.frozen_at_ms),
        "correlation_id",
        entry.correlation_id,
        "created_at_ms",
        str(entry.created_at_ms),
        "updated_at_ms",
        str(entry.updated_at_ms),
        "wal_sequence",
        str(entry.wal_sequence),
        "reason",
        entry.reason or "",
        "failed_at_ms",
        "" if entry.failed_at_ms is None else str(entry.failed_at_ms),
    ]


def entry_fields(entry: Entry) -> dict[str, str]:
    """An entry as the string hash stored at ``entry:<id>``."""
    items = iter(entry_items(entry))
    return dict(zip(items, items, strict=True))


def finalize_message(
    entry_id: str, account_id: str, charged_micro: int, correlation_id: str, created_ms: int
) -> dict[str, str]:
    """The fields of a finalize-stream message for a new charge (first attempt)."""
    return {
        "billing_entry_id": entry_id,
        "account_id": account_id,
        "actual_cost_micro": str(charged_micro),
        "correlation_id": correlation_id,
        "attempt": "1",
        "reason": "commit",
        "created_at": str(created_ms),
    }


def dead_letter(entry: Entry, attempts: int | None) -> dict[str, str]:
    """The fields of the dead letter of a FINALIZE_FAILED entry (attempts unknown on a rebuild)."""
    return letter_fields(
        entry.billing_entry_id,
        entry.account_id,
        charged_micro=entry.charged_micro,
        correlation_id=entry.correlation_id,
        attempts=attempts,
        reason=entry.reason or "",
        failed_at_ms=entry.failed_at_ms,
    )


def letter_fields(
    entry_id: str,
    account_id: str,
    *,
    charged_micro: int,
    correlation_id: str,
    attempts: int | None,
    reason: str,
    failed_at_ms: int | None,
) -> dict[str, str]:
    """The one layout of a dead letter's fields, live (a ``billing_finalize_fail``) or rebuilt."""
    return {
        "billing_entry_id": entry_id,
        "account_id": account_id,
        "actual_cost_micro": str(charged_micro),
        "correlation_id": correlation_id,
        "attempt": "" if attempts is None else str(attempts),
        "reason": reason,
        "failed_at": "" if failed_at_ms is None else str(failed_at_ms),
    }


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _incr(key: str, *deltas: tuple[str, int], checked: bool = True) -> list[Op]:
    """One money op for several fields of one hash (integer deltas, in order); zero deltas are left out."""
    op: Op = [OP_CHECKED if checked else OP_DELTA, key]
    for name, delta in deltas:
        if delta:
            op.append(name)
            op.append(delta)
    return [op] if len(op) > 2 else []


SETTLED: Final = ARCHIVABLE
"""States whose entries are history: they leave the projection (their hash is deleted) when they get there."""


def is_live(entry: Entry) -> bool:
    """Whether the projection keeps ``entry``'s hash (a live hold, or a charge not yet settled)."""
    return entry.state not in SETTLED


def _move(keys: Keys, event: ev.Event, from_state: EntryState, to_state: EntryState, **fields: str) -> list[Op]:
    """Counter moves and the entry fields every transition updates; a settled entry's hash is deleted."""
    counts: Op = (
        [OP_COUNTS, keys.counters, _STATE[to_state], 1]
        if from_state is S.IDLE
        else [OP_COUNTS, keys.counters, _STATE[from_state], -1, _STATE[to_state], 1]
    )
    if to_state in SETTLED:
        return [counts, [OP_DEL, keys.entry(event.billing_entry_id)]]
    changed: Op = [
        OP_HSET,
        keys.entry(event.billing_entry_id),
        "state",
        _STATE[to_state],
        "updated_at_ms",
        str(event.timestamp_ms),
        "wal_sequence",
        str(event.wal_sequence),
    ]
    for name, value in fields.items():
        changed += (name, value)
    return [counts, changed]


def _created(keys: Keys, event: ev.Event) -> list[Op]:
    entry = new_entry(event)
    ops: list[Op] = [[OP_COUNTS, keys.counters, _STATE[entry.state], 1]]
    if is_live(entry):  # a direct charge in standalone mode is settled at once: no hash
        ops.append([OP_HSET, keys.entry(entry.billing_entry_id), *entry_items(entry)])
    if entry.state is S.RESERVE_HELD:
        ops.append([OP_ZADD, keys.expiry, str(entry.expires_at_ms), entry.billing_entry_id])
    if entry.state is S.FINALIZE_PENDING:
        message = finalize_message(
            entry.billing_entry_id, entry.account_id, entry.charged_micro, entry.correlation_id, event.timestamp_ms
        )
        ops.append([OP_XADD, keys.finalize, *_flat(message)])
    return ops


def _reserve(keys: Keys, event: ev.Event, p: ev.BillingReserve) -> list[Op]:
    estimate = p.estimated_cost_micro
    return [*_incr(keys.account(p.account_id), (AVAILABLE, -estimate), (HELD, estimate)), *_created(keys, event)]


def _charge(keys: Keys, event: ev.Event, p: ev.BillingCharge) -> list[Op]:
    charged = p.charged_micro
    return [
        *_incr(
            keys.account(p.account_id),
            (AVAILABLE, -charged),
            (CHARGED, charged),
            (UNSETTLED, charged if p.finalize else 0),
        ),
        *_incr(keys.ledger, (REVENUE, charged), checked=False),
        *_created(keys, event),
    ]


def _commit(keys: Keys, event: ev.Event, p: ev.BillingCommit) -> list[Op]:
    target = S.FINALIZE_PENDING if p.finalize else S.COMMITTED
    estimate, charged = p.estimated_cost_micro, p.charged_micro
    ops: list[Op] = [
        *_incr(
            keys.account(p.account_id),
            (HELD, -estimate),
            (AVAILABLE, estimate - charged),
            (CHARGED, charged),
            (UNSETTLED, charged if p.finalize else 0),
        ),
        *_incr(keys.ledger, (REVENUE, charged), checked=False),
        *_move(
            keys,
            event,
            S.RESERVE_HELD,
            target,
            actual_cost_micro=str(p.actual_cost_micro),
            charged_micro=str(charged),
            uncollected_micro=str(p.uncollected_micro),
        ),
        [OP_ZREM, keys.expiry, event.billing_entry_id],
    ]
    if p.finalize:
        message = finalize_message(
            event.billing_entry_id, p.account_id, charged, event.correlation_id, event.timestamp_ms
        )
        ops.append([OP_XADD, keys.finalize, *_flat(message)])
    return ops


def _return_hold(keys: Keys, event: ev.Event, account_id: str, estimate: int, reason: str) -> list[Op]:
    return [
        *_incr(keys.account(account_id), (HELD, -estimate), (AVAILABLE, estimate)),
        *_move(keys, event, S.RESERVE_HELD, S.RELEASED, reason=reason),
        [OP_ZREM, keys.expiry, event.billing_entry_id],
    ]


def _void(keys: Keys, event: ev.Event, p: ev.BillingVoid) -> list[Op]:
    from_state = S(p.from_state)
    failed = from_state is S.FINALIZE_FAILED
    charged = p.charged_micro
    ops = [
        *_incr(
            keys.account(p.account_id),
            (UNSETTLED, -charged if failed else 0),
            (AVAILABLE, charged),
            (CHARGED, -charged),
        ),
        *_incr(keys.ledger, (REVENUE, -charged), checked=False),
        *_move(keys, event, from_state, S.VOIDED, reason=p.reason),
    ]
    if failed:
        ops.append([OP_UNPOISON, keys.poison, keys.entry(event.billing_entry_id)])
    return ops


def _ack(keys: Keys, event: ev.Event, p: ev.BillingFinalizeAck) -> list[Op]:
    from_state = S(p.from_state)
    ops = [
        *_incr(keys.account(p.account_id), (UNSETTLED, -p.charged_micro)),
        *_move(keys, event, from_state, S.FINALIZE_ACKED),
    ]
    if from_state is S.FINALIZE_FAILED:
        ops.append([OP_UNPOISON, keys.poison, keys.entry(event.billing_entry_id)])
    return ops


def _fail(keys: Keys, event: ev.Event, p: ev.BillingFinalizeFail) -> list[Op]:
    failed_at = str(event.timestamp_ms)
    letter = letter_fields(
        event.billing_entry_id,
        p.account_id,
        charged_micro=p.charged_micro,
        correlation_id=event.correlation_id,
        attempts=p.attempts,
        reason=p.reason,
        failed_at_ms=event.timestamp_ms,
    )
    return [
        *_move(keys, event, S.FINALIZE_PENDING, S.FINALIZE_FAILED, reason=p.reason, failed_at_ms=failed_at),
        [OP_POISON, keys.poison, keys.entry(event.billing_entry_id), *_flat(letter)],
    ]


def _credit(keys: Keys, p: ev.CreditMint | ev.CreditDeduct | ev.X402CreditNote) -> list[Op]:
    acct, amount = keys.account(p.account_id), p.amount_micro
    if isinstance(p, ev.CreditDeduct):
        return [*_incr(acct, (AVAILABLE, -amount)), *_incr(keys.ledger, (FUNDING, amount), checked=False)]
    system = FUNDING if isinstance(p, ev.CreditMint) else CREDIT_NOTES
    return [*_incr(acct, (AVAILABLE, amount)), *_incr(keys.ledger, (system, -amount), checked=False)]


def _archive(keys: Keys, p: ev.EntriesArchived) -> list[Op]:
    """One count op for the archived entries' states, then a DEL of each one's hash and stored response."""
    counts: dict[str, int] = {}
    deletes: list[Op] = []
    for item in p.entries:
        counts[item.state] = counts.get(item.state, 0) - 1
        deletes.append([OP_DEL, keys.entry(item.billing_entry_id)])
        deletes.append([OP_DEL, keys.response(item.billing_entry_id)])
    if not counts:
        return []
    tally: Op = [OP_COUNTS, keys.counters]
    for name, delta in counts.items():
        tally += (name, delta)
    return [tally, *deletes]


def event_ops(keys: Keys, event: ev.Event) -> list[Op]:  # noqa: C901 - one flat case per event type
    """The projection operations of one event (empty for events with no projection)."""
    p = event.payload
    match p:
        case ev.BillingReserve():
            return _reserve(keys, event, p)
        case ev.BillingCharge():
            return _charge(keys, event, p)
        case ev.BillingCommit():
            return _commit(keys, event, p)
        case ev.BillingRelease():
            return _return_hold(keys, event, p.account_id, p.estimated_cost_micro, p.reason)
        case ev.BillingReserveExpired():
            return _return_hold(keys, event, p.account_id, p.estimated_cost_micro, "expired")
        case ev.BillingReserveExtended():
            fields = {"expires_at_ms": str(p.expires_at_ms), "updated_at_ms": str(event.timestamp_ms)}
            fields["wal_sequence"] = str(event.wal_sequence)
            return [
                [OP_HSET, keys.entry(event.billing_entry_id), *_flat(fields)],
                [OP_ZADD, keys.expiry, str(p.expires_at_ms), event.billing_entry_id],
            ]
        case ev.BillingVoid():
            return _void(keys, event, p)
        case ev.BillingFinalizeAck():
            return _ack(keys, event, p)
        case ev.BillingFinalizeFail():
            return _fail(keys, event, p)
        case ev.CreditMint() | ev.CreditDeduct() | ev.X402CreditNote():
            return _credit(keys, p)
        case ev.EntriesArchived():
            return _archive(keys, p)
    return []


@dataclass
class Batch:
    """KEYS and ARGV of one ``apply_batch`` call: every key, and the operations in one blob."""

    keys: list[str] = field(default_factory=list)
    argv: list[bytes] = field(default_factory=list)
    first_seq: int = 0
    last_seq: int = 0


HSET_ARGS_MAX: Final = 256
"""A merged HSET longer than this keeps each field once (Lua's ``unpack`` takes at most ~8,000 values)."""


class _Fold:
    """The net effect of many events' operations: what one script call has to do for all of them.

    Applying the events one by one and applying their fold leave Redis the same, with fewer
    commands: a hold and its commit in one batch write the entry hash with one HSET and touch
    the expiry index once, and a balance field takes at most two HINCRBYs however many events
    move it.

    - Money (``I``, ``C``): per hash field, the sum of the deltas. A checked field (``I``) also
      keeps its *low point*, the most negative running sum (0 if it never dips) and the
      sequence of the event that reached it (else of the first event that moved the field),
      which a refusal names: the script adds the low point first and checks
      the balance, then adds the rest (``total - low``, never negative). The balance went
      negative somewhere in the batch exactly when it is negative at the low point, so the
      script refuses what the event-by-event check refused.
    - Counts (``N``): summed per field; zero sums are dropped.
    - Hash fields (``H``): one HSET per hash with every field-value pair in event order (HSET
      takes repeated fields in order: the last value wins). The ops that also touch an entry
      hash, ``P`` and ``Q``, only use its ``poison_id`` field, which ``H`` never writes.
    - Expiry index (``Z``, ``R``): the last op per member wins. Stored responses (``S``): the
      last value per key.
    - Stream ops (``X``, ``P``, ``Q``) are kept, in order.
    - Deletes (``D``, of a settled entry's hash, or an archived one's old stored response): each drops the pending
      HSET or SET of its key and comes last, after the stream ops (a ``Q`` reads the entry's
      ``poison_id`` before the hash goes). An archived entry is never written again: an ``H``
      after a ``D`` of its key is refused; an ``S`` after one replaces it (SET needs no DEL).
    """

    __slots__ = ("checked", "counts", "deletes", "hashes", "members", "streams", "unchecked", "values")

    def __init__(self) -> None:
        self.checked: dict[str | int, dict[str | int, list[int]]] = {}  # key -> field -> [total, low, seq]
        self.unchecked: dict[str | int, dict[str | int, int]] = {}  # key -> field -> total
        self.counts: dict[str | int, dict[str | int, int]] = {}
        self.hashes: dict[str | int, Op] = {}
        self.members: dict[tuple[str | int, str | int], Op] = {}
        self.values: dict[str | int, Op] = {}
        self.streams: list[Op] = []
        self.deletes: dict[str | int, Op] = {}

    def add(self, op: Op, seq: int) -> None:
        """Fold one op of the event at ``seq`` into the net effect."""
        code, key = op[0], op[1]
        if code == OP_CHECKED:
            self._checked(key, op, seq)
        elif code == OP_HSET:
            merged = self.hashes.get(key)
            if merged is None:
                self.hashes[key] = op
            else:
                merged += op[2:]
                if len(merged) > HSET_ARGS_MAX:  # one hash written over and over: keep each field once
                    items = iter(merged[2:])
                    merged[2:] = [item for pair in dict(zip(items, items, strict=True)).items() for item in pair]
        elif code in (OP_COUNTS, OP_DELTA):
            sums = (self.counts if code == OP_COUNTS else self.unchecked).setdefault(key, {})
            for i in range(2, len(op), 2):
                sums[op[i]] = sums.get(op[i], 0) + int(op[i + 1])
        elif code in (OP_ZADD, OP_ZREM):
            self.members[key, op[-1]] = op  # the member is the last argument of both
        elif code in (OP_SET, OP_DEL):
            self._replace(key, op)
        else:
            self.streams.append(op)

    def _replace(self, key: str | int, op: Op) -> None:
        """A SET (replaces a DEL before it) or a DEL (drops the HSET or SET before it)."""
        if op[0] == OP_SET:
            self.values[key] = op
            self.deletes.pop(key, None)
        else:
            self.hashes.pop(key, None)
            self.values.pop(key, None)
            self.deletes[key] = op

    def _checked(self, key: str | int, op: Op, seq: int) -> None:
        fields = self.checked.get(key)
        if fields is None:
            fields = self.checked[key] = {}
        for i in range(2, len(op), 2):
            delta = int(op[i + 1])
            found = fields.get(op[i])
            if found is None:
                fields[op[i]] = [delta, min(delta, 0), seq]  # seq: the low point's event, else the first
            else:
                found[0] += delta
                if found[0] < found[1]:
                    found[1], found[2] = found[0], seq

    def money(self) -> list[Op]:
        """The money ops: ``I`` key field low rest seq, then ``C`` key field delta."""
        out: list[Op] = [
            [OP_CHECKED, key, name, str(low), str(total - low), seq]
            for key, fields in self.checked.items()
            for name, (total, low, seq) in fields.items()
            if total or low
        ]
        out += (
            [OP_DELTA, key, name, str(total)]
            for key, sums in self.unchecked.items()
            for name, total in sums.items()
            if total
        )
        return out

    def rest(self) -> list[Op]:
        """Every other op: counts, hashes, expiry members, responses, the stream ops in order, then deletes."""
        if self.deletes and not self.deletes.keys().isdisjoint(self.hashes):
            raise ValueError("an entry hash is written after it was deleted in the same batch")
        out: list[Op] = []
        for key, sums in self.counts.items():
            op: Op = [OP_COUNTS, key]
            for name, total in sums.items():
                if total:
                    op += (name, str(total))
            if len(op) > 2:
                out.append(op)
        out += self.hashes.values()
        out += self.members.values()
        out += self.values.values()
        out += self.streams
        out += self.deletes.values()
        return out


_PACK: Final = msgspec.msgpack.Encoder()


def encode_batch(keys: Keys, events: Iterable[ev.Event], owner: str, epoch: int | None = None) -> Batch:
    """Pack the net operations of ``events`` (consecutive sequences) for ``apply_batch.lua``.

    ``owner`` is the identity of the writing data directory (ARGV[2]): the script applies
    nothing to a projection another one owns. ``epoch`` (cluster mode: the shard's lease epoch,
    ARGV[3]) makes the script refuse the batch if a newer epoch wrote the projection.

    ARGV[1] is one msgpack array ``[first_seq, last_seq, money, rest]``, each of the last two a
    list of ``[opcode, arg, …]``: the events' operations folded into their net effect
    (:class:`_Fold`), the money ops apart so that the script's money pass reads nothing else.
    Key arguments are indexes into KEYS and every other argument is a string (a sequence where
    an ``I`` op names the event of its low point). A few arguments per call instead of ~50 per
    event (the client packs each argument in Python), and fewer Redis commands than events.
    """
    fold = _Fold()
    first = last = 0
    for event in events:
        last = event.wal_sequence
        first = first or last
        for op in event_ops(keys, event):
            fold.add(op, last)
    names = [keys.meta]
    index: dict[str | int, int] = {keys.meta: 1}
    known = index.get
    money, rest = fold.money(), fold.rest()
    for op in itertools.chain(money, rest):  # key names become KEYS indexes in place (fresh lists)
        for at in _KEYS_AT.get(op[0], _FIRST):
            name = op[at]
            found = known(name)
            if found is None:
                names.append(str(name))
                found = index[name] = len(names)
            op[at] = found
    argv = [_PACK.encode([first, last, money, rest]), owner.encode()]
    if epoch is not None:
        argv.append(str(epoch).encode())
    return Batch(names, argv, first, last)


# -- rebuild -------------------------------------------------------------------------------

Command = tuple[str, ...]


def rebuild_commands(keys: Keys, state: State) -> Iterable[Command]:
    """Redis commands that recreate the projection of ``state`` (its live entries) on an empty shard.

    ``applied_seq`` is not among them: the caller sets it last, once all of these succeeded.
    Dead letters are not here either (they need the stream id back): see :func:`dead_letters`.
    """
    ledger = {REVENUE: state.revenue_micro, FUNDING: state.funding_micro, CREDIT_NOTES: state.credit_notes_micro}
    yield ("HSET", keys.ledger, *_flat({name: str(value) for name, value in ledger.items()}))
    counts = {entry_state.value: count for entry_state, count in state.state_counts().items()}
    if counts:
        yield ("HSET", keys.counters, *_flat({name: str(value) for name, value in counts.items()}))
    for account_id, account in state.accounts.items():
        balances = {AVAILABLE: account.available_micro, HELD: account.held_micro}
        balances |= {CHARGED: account.charged_micro, UNSETTLED: account.unsettled_micro}
        yield ("HSET", keys.account(account_id), *_flat({name: str(value) for name, value in balances.items()}))
    for entry in state.iter_entries():
        if not is_live(entry):
            continue
        yield ("HSET", keys.entry(entry.billing_entry_id), *_flat(entry_fields(entry)))
        if entry.state is S.RESERVE_HELD:
            yield ("ZADD", keys.expiry, str(entry.expires_at_ms), entry.billing_entry_id)
        elif entry.state is S.FINALIZE_PENDING:
            message = finalize_message(
                entry.billing_entry_id, entry.account_id, entry.charged_micro, entry.correlation_id, entry.updated_at_ms
            )
            yield ("XADD", keys.finalize, "*", *_flat(message))


def dead_letters(state: State) -> list[Entry]:
    """The FINALIZE_FAILED entries whose dead letters a rebuild must recreate, in id order."""
    return [entry for entry in state.iter_entries() if entry.state is S.FINALIZE_FAILED]
