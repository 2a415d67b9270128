"""``decide``: (state, command, now) → write, replay or refusal. Pure.

Every command is judged here against the current state, before anything is written. The
answer is one of:

- :class:`Write` — the events to append (the engine sequences, applies and syncs them);
- :class:`Replay` — an idempotent repeat, answered from state once the original is durable;
- :class:`Fetch` — the command concerns a settled entry, of which the state keeps only a packed
  record: the engine reads the entry back from the log (the sequences named) and asks again
  with it in ``loaded``. A repeat or a wrong move on a settled entry then gets the same answer
  as when the whole entry was in memory. A request key finds settled records by its hash only:
  each candidate is read back and must carry the very account and request id, so a hash
  collision costs a read, never another request's answer;
- :class:`~tollway.core.commands.Refusal` — a typed business outcome; nothing is written.

The checks run in a fixed order: idempotency first (a retry must get its original answer even
when the account has since run dry), then form and limits, then the gates (guard, risk caps),
then funds. ``decide`` reads the state but never changes it, and takes the clock reading and
the id factory as arguments, so the same inputs give the same answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, Protocol, TypeVar

import msgspec

from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.commands import Policy, Refusal, RefusalCode
from tollway.core.errors import ensure
from tollway.core.lifecycle import EntryKind, EntryState, HoldEnd, can_transition
from tollway.core.money import INT64_MAX, MICRO_PER_USD, Rounding, micro_to_cu, usdc_to_usd_micro
from tollway.core.state import (
    CreditRecord,
    Entry,
    Settled,
    State,
    credit_fingerprint,
    request_key,
    split_request_key,
)

S = EntryState
_RESERVE: Final = EntryKind.RESERVE  # module constants: an Enum's attribute costs ~0.2 µs on Python 3.11
_RELEASED: Final = S.RELEASED
_EXPIRED: Final = HoldEnd.EXPIRED.value
GONE: Final = " (never made, or archived past the retention)"
"""Why an entry id is unknown: the end of every ``not_found`` message about one."""


class Write(msgspec.Struct, frozen=True, gc=False):
    """Append ``payloads`` for ``billing_entry_id``; the result is read from state after."""

    billing_entry_id: str
    payloads: tuple[ev.Payload, ...]
    correlation_id: str
    created: bool = False


class Replay(msgspec.Struct, frozen=True, gc=False):
    """Answer with ``outcome``, once the event at ``wal_sequence`` is durable."""

    outcome: cmd.EntryResult | cmd.CreditResult
    wal_sequence: int


class Fetch(msgspec.Struct, frozen=True, gc=False):
    """Read the settled entry ``billing_entry_id`` back from the events at ``sequences``, then decide again."""

    billing_entry_id: str
    sequences: tuple[int, ...]
    record: Settled  # the record it was asked for: an answer holds only while the state still has this one


class Loaded(msgspec.Struct, frozen=True, gc=False):
    """A settled entry read back from the log for a :class:`Fetch`, with its stored response."""

    record: Settled
    entry: Entry
    response_json: str | None


Decision = Write | Replay | Refusal | Fetch
NewId = Callable[[], str]
Loads = Mapping[str, Loaded]
NOTHING_LOADED: Final[Loads] = {}


def decide(  # noqa: C901 - one flat case per command type
    state: State, command: cmd.Command, now_ms: int, policy: Policy, new_id: NewId, *, loaded: Loads = NOTHING_LOADED
) -> Decision:
    """Judge ``command`` against ``state`` at ``now_ms``; ``loaded``: settled entries read back for a :class:`Fetch`."""
    match command:
        case cmd.Reserve():
            return _reserve(state, command, now_ms, policy, new_id, loaded=loaded)
        case cmd.Commit():
            return _commit(state, command, now_ms, policy, loaded)
        case cmd.Release():
            return _release(state, command, now_ms, loaded)
        case cmd.Extend():
            return _extend(state, command, now_ms, policy, loaded)
        case cmd.Expire():
            return _expire(state, command, now_ms, loaded)
        case cmd.Charge():
            return _charge(state, command, now_ms, policy, new_id, loaded=loaded)
        case cmd.Void() | cmd.FinalizeAck() | cmd.FinalizeFail():
            return _settle(state, command, loaded)
        case cmd.Credit():
            return _credit(state, command, policy, new_id)
        case cmd.Note():
            return Write(command.billing_entry_id or new_id(), (command.payload,), command.correlation_id)
        case cmd.Archive():
            return _archive(state, command, new_id)


def outcome(
    state: State, write: Write, command: cmd.Command, entry: Entry | None = None, response_json: str | None = None
) -> cmd.Outcome:
    """The answer to ``command`` once its ``write`` has been applied to ``state``.

    ``entry`` is the entry as the write left it (it may have settled and left ``state``);
    ``response_json`` its stored response before the write (a commit's is the command's own).
    """
    if isinstance(command, cmd.Credit):
        account = state.account(command.account_id)
        balance = account.copy()
        return cmd.CreditResult(
            command.account_id, command.credit_id, command.kind, command.amount_micro, state.last_sequence, balance
        )
    if isinstance(command, cmd.Note):
        return cmd.NoteResult(state.last_sequence)
    if isinstance(command, cmd.Archive):
        match write.payloads:
            case (ev.EntriesArchived() as archived,):
                return cmd.ArchiveResult(len(archived.entries), state.last_sequence, len(archived.credits))
    if entry is None:
        entry = state.entries[write.billing_entry_id]
        response_json = state.responses.get(entry.billing_entry_id)
    elif isinstance(command, cmd.Commit):
        response_json = command.response_json
    return cmd.EntryResult(entry, created=write.created, response_json=response_json)


# -- helpers -------------------------------------------------------------------------------


def _archive(state: State, command: cmd.Archive, new_id: NewId) -> Write | Refusal:
    """One ``entries_archived`` event: the oldest archivable entries, then credit records; NOT_FOUND if none.

    ``limit`` bounds the two together.
    """
    found = state.archivable(command.older_than_ms, command.limit)
    old_credits = state.archivable_credits(command.older_than_ms, command.limit - len(found))
    if not found and not old_credits:
        return _refuse(RefusalCode.NOT_FOUND, "no entry or credit record is old enough to archive")
    items = tuple(found)
    credit_items = tuple(
        ev.ArchivedCredit(*split_request_key(key), record.credit_event_id) for key, record in old_credits
    )
    return Write(new_id(), (ev.EntriesArchived(command.older_than_ms, items, credit_items),), "archiver")


def _refuse(code: RefusalCode, message: str, **details: object) -> Refusal:
    return Refusal(code, message, details)


def _invalid(message: str, field: str) -> Refusal:
    return _refuse(RefusalCode.INVALID_REQUEST, message, field=field)


def _transition_refusal(entry: Entry, attempted: str) -> Refusal:
    return _refuse(
        RefusalCode.INVALID_TRANSITION,
        f"cannot {attempted} an entry in state {entry.state.value}",
        current_state=entry.state.value,
        attempted=attempted,
    )


def _replay(entry: Entry, state: State) -> Replay:
    """Answer with ``entry`` as it is; a settled entry's stored response is filled in by the engine (it read it)."""
    response = state.responses.get(entry.billing_entry_id)
    return Replay(cmd.EntryResult(entry, replayed=True, response_json=response), entry.wal_sequence)


def _entry_of(state: State, entry_id: str, loaded: Loads) -> Entry | Fetch | None:
    """The whole entry ``entry_id``: in memory, read back for this command, or to be read (a Fetch); None: unknown."""
    entry = state.entries.get(entry_id)
    if entry is not None:
        return entry
    record = state.settled.get(entry_id)
    if record is None:
        return None
    found = loaded.get(entry_id)
    if found is not None and found.record == record:
        return found.entry
    return Fetch(entry_id, record.seqs, record)


def _settled_request(state: State, account_id: str, request_id: str, loaded: Loads) -> Entry | Fetch | None:
    """The settled entry of this request key: each record with its hash is read back and confirmed in turn."""
    for record in state.settled.by_request(account_id, request_id):
        found = loaded.get(record.billing_entry_id)
        if found is None or found.record != record:
            return Fetch(record.billing_entry_id, record.seqs, record)
        if (found.entry.account_id, found.entry.request_id) == (account_id, request_id):
            return found.entry
    return None  # no record, or only other requests' records whose hash matches (read back, told apart)


def _insufficient(available_micro: int, requested_micro: int, rate: int) -> Refusal:
    deficit = requested_micro - available_micro
    return _refuse(
        RefusalCode.INSUFFICIENT_FUNDS,
        f"available {available_micro} micro-USD is less than the {requested_micro} requested",
        available_micro=available_micro,
        requested_micro=requested_micro,
        deficit_micro=deficit,
        available_cu=micro_to_cu(available_micro, rate, Rounding.DOWN),
        requested_cu=micro_to_cu(requested_micro, rate, Rounding.UP),
        deficit_cu=micro_to_cu(deficit, rate, Rounding.UP),
    )


class _OnEntry(Protocol):
    """A command on an existing entry."""

    @property
    def billing_entry_id(self) -> str:
        """The entry it applies to."""
        ...


C = TypeVar("C", bound=_OnEntry)
Repeat = Callable[[State, Entry, C], Decision | None]
"""A verb's own answer to a repeat of itself (a replay, or a refusal), None when it is no repeat."""


def _find(
    state: State,
    c: C,
    verb: str,
    target: EntryState,
    now_ms: int | None,
    *,
    loaded: Loads,
    repeat: Repeat[C] | None = None,
) -> Entry | Decision:
    """The entry that ``verb`` moves to ``target``, or the answer instead; the one legality check of ``decide``.

    In order: NOT_FOUND; a Fetch of a settled entry not read back yet (``loaded``: those that were);
    ``repeat``'s answer; for a verb on a live hold (``now_ms`` given),
    RESERVATION_EXPIRED for a hold that expired, whether or not the sweeper got to it yet;
    INVALID_TRANSITION when the lifecycle table does not allow the move.
    """
    entry = state.entries.get(c.billing_entry_id) or _entry_of(state, c.billing_entry_id, loaded)
    if entry is None:
        entry_id = c.billing_entry_id
        return _refuse(RefusalCode.NOT_FOUND, f"no billing entry {entry_id}{GONE}", billing_entry_id=entry_id)
    if isinstance(entry, Fetch):
        return entry
    answer = None if repeat is None else repeat(state, entry, c)
    if answer is not None:
        return answer
    if now_ms is not None and entry.state is _RELEASED and entry.reason == _EXPIRED:
        return _expired_refusal(entry)
    if not can_transition(entry.state, target):
        return _transition_refusal(entry, verb)
    if now_ms is not None and _is_expired(entry, now_ms):
        return _expired_refusal(entry)
    return entry


def _expired_refusal(entry: Entry) -> Refusal:
    return _refuse(
        RefusalCode.RESERVATION_EXPIRED,
        f"the hold expired at {entry.expires_at_ms} ms",
        expires_at_ms=entry.expires_at_ms,
        current_state=entry.state.value,
    )


def _is_expired(entry: Entry, now_ms: int) -> bool:
    return entry.expires_at_ms is not None and now_ms >= entry.expires_at_ms


def _gates(state: State, account_id: str, policy: Policy) -> Refusal | None:
    """The checks every new hold passes: guard, reconciliation cap, per-account risk cap."""
    if not policy.holds_allowed:
        return _refuse(RefusalCode.GUARD_UNAVAILABLE, "the conservation guard is not ready", retry_after_seconds=30)
    if state.finalize_failed_count >= policy.max_pending_reconciliation:
        return _refuse(
            RefusalCode.BILLING_SERVICE_UNAVAILABLE,
            f"{state.finalize_failed_count} charges await reconciliation",
            retry_after_seconds=30,
        )
    unsettled = state.account(account_id).unsettled_micro
    if unsettled * policy.credit_units_per_usd > policy.max_pending_risk_cu * MICRO_PER_USD:
        return _refuse(
            RefusalCode.PENDING_SETTLEMENT_LIMIT,
            f"unsettled charges exceed {policy.max_pending_risk_cu} CU",
            unsettled_micro=unsettled,
            limit_cu=policy.max_pending_risk_cu,
        )
    return None


def _amount_limit(amount_micro: int, policy: Policy, field: str) -> Refusal | None:
    if amount_micro > policy.max_request_cost_micro:
        return _invalid(f"{field} exceeds the limit of {policy.max_request_cost_micro} micro-USD", field)
    return None


def _ttl(ttl_s: int | None, policy: Policy) -> int | Refusal:
    ttl = policy.reserve_ttl_s if ttl_s is None else ttl_s
    if not 0 < ttl <= policy.reserve_ttl_s_max:
        return _invalid(f"ttl_s must be between 1 and {policy.reserve_ttl_s_max}", "ttl_s")
    return ttl


# -- reserve, commit, release, extend, expire ----------------------------------------------


def reserve_fingerprint(command: cmd.Reserve) -> str:
    """What makes two reserves with one ``request_id`` the same request."""
    return f"reserve:{command.estimated_cost_micro}:{command.basis}"


def _known_request(
    state: State, account_id: str, request_id: str, fingerprint: str, loaded: Loads
) -> Entry | Refusal | Fetch | None:
    """The entry an earlier request with this key created (None: a new key), key reuse, or a Fetch of it."""
    existing = state.requests.get(request_key(account_id, request_id))
    if existing is None:
        found = _settled_request(state, account_id, request_id, loaded)
        if found is None or isinstance(found, Fetch):
            return found
        existing, entry = found.billing_entry_id, found
    else:
        live = _entry_of(state, existing, loaded)
        if live is None or isinstance(live, Fetch):
            ensure(live is not None, "request key of unknown entry %s", existing)
            return live
        entry = live
    if entry.fingerprint != fingerprint:
        return _refuse(
            RefusalCode.IDEMPOTENCY_KEY_REUSED,
            "request_id was used before with different parameters",
            billing_entry_id=existing,
        )
    return entry


def _reserve(state: State, c: cmd.Reserve, now_ms: int, policy: Policy, new_id: NewId, *, loaded: Loads) -> Decision:
    fingerprint = reserve_fingerprint(c)
    known = _known_request(state, c.account_id, c.request_id, fingerprint, loaded)
    if isinstance(known, Refusal | Fetch):
        return known
    if known is not None:
        if known.state is S.RESERVE_HELD:
            return _refuse(
                RefusalCode.REQUEST_IN_PROGRESS, "this request is still held", billing_entry_id=known.billing_entry_id
            )
        return _replay(known, state)
    refusal = _amount_limit(c.estimated_cost_micro, policy, "estimated_cost_micro")
    ttl = _ttl(c.ttl_s, policy)
    if isinstance(ttl, Refusal):
        return ttl
    refusal = refusal or _gates(state, c.account_id, policy)
    if refusal is not None:
        return refusal
    available = state.account(c.account_id).available_micro
    if available < c.estimated_cost_micro:
        return _insufficient(available, c.estimated_cost_micro, policy.credit_units_per_usd)
    payload = ev.BillingReserve(
        c.account_id, c.request_id, c.estimated_cost_micro, now_ms + ttl * 1000, policy.rate(now_ms), fingerprint
    )
    return Write(new_id(), (payload,), c.correlation_id, created=True)


def _charged(entry: Entry, actual_micro: int, available_micro: int, policy: Policy) -> int:
    """How much of ``actual_micro`` a commit takes, under the overrun policy."""
    estimate = entry.estimated_cost_micro
    if actual_micro <= estimate:
        return actual_micro
    if policy.overrun_policy is cmd.OverrunPolicy.CAP:
        return estimate
    return estimate + min(actual_micro - estimate, available_micro)


_COMMIT_TARGET: Final = (S.COMMITTED, S.FINALIZE_PENDING)  # by policy.finalize


def _repeated_commit(state: State, entry: Entry, c: cmd.Commit) -> Decision | None:
    if entry.kind is not _RESERVE or entry.actual_cost_micro is None:
        return None
    if entry.actual_cost_micro == c.actual_cost_micro:
        return _replay(entry, state)
    return _transition_refusal(entry, "commit")


def _commit(state: State, c: cmd.Commit, now_ms: int, policy: Policy, loaded: Loads) -> Decision:
    entry = _find(state, c, "commit", _COMMIT_TARGET[policy.finalize], now_ms, loaded=loaded, repeat=_repeated_commit)
    if not isinstance(entry, Entry):
        return entry
    refusal = _amount_limit(c.actual_cost_micro, policy, "actual_cost_micro")
    if refusal is not None:
        return refusal
    if c.response_json is not None and len(c.response_json.encode()) > policy.max_response_bytes:
        return _invalid(f"response is larger than {policy.max_response_bytes} bytes", "response")
    charged = _charged(entry, c.actual_cost_micro, state.account(entry.account_id).available_micro, policy)
    payloads: tuple[ev.Payload, ...] = (
        ev.BillingCommit(
            entry.account_id,
            entry.estimated_cost_micro,
            c.actual_cost_micro,
            charged,
            c.actual_cost_micro - charged,
            policy.overrun_policy.value,
            policy.finalize,
            entry.rate,
        ),
    )
    if c.response_json is not None:
        payloads += (ev.RequestComplete(entry.account_id, entry.request_id, c.response_json),)
    return Write(entry.billing_entry_id, payloads, entry.correlation_id)


def _repeated_release(state: State, entry: Entry, c: cmd.Release) -> Decision | None:  # noqa: ARG001 - a Repeat
    released = entry.state is _RELEASED and entry.reason != _EXPIRED
    return _replay(entry, state) if released else None


def _release(state: State, c: cmd.Release, now_ms: int, loaded: Loads) -> Decision:
    if c.reason not in cmd.RELEASE_REASONS:
        return _invalid(f"reason must be one of {sorted(cmd.RELEASE_REASONS)}", "reason")
    entry = _find(state, c, "release", _RELEASED, now_ms, loaded=loaded, repeat=_repeated_release)
    if not isinstance(entry, Entry):
        return entry
    payload = ev.BillingRelease(entry.account_id, entry.estimated_cost_micro, c.reason)
    return Write(entry.billing_entry_id, (payload,), entry.correlation_id)


def _extend(state: State, c: cmd.Extend, now_ms: int, policy: Policy, loaded: Loads) -> Decision:
    # An extension keeps the hold as it is: legal exactly while the hold may still end (RELEASED).
    entry = _find(state, c, "extend", _RELEASED, now_ms, loaded=loaded)
    if not isinstance(entry, Entry):
        return entry
    ttl = _ttl(c.ttl_s, policy)
    if isinstance(ttl, Refusal):
        return ttl
    expires_at_ms = now_ms + ttl * 1000
    assert entry.expires_at_ms is not None  # every hold has one
    if expires_at_ms <= entry.expires_at_ms:  # never shortens a hold; nothing to write
        return Replay(cmd.EntryResult(entry), entry.wal_sequence)
    payload = ev.BillingReserveExtended(entry.account_id, expires_at_ms, entry.expires_at_ms)
    return Write(entry.billing_entry_id, (payload,), entry.correlation_id)


def _expire(state: State, c: cmd.Expire, now_ms: int, loaded: Loads) -> Decision:
    entry = _find(state, c, "expire", _RELEASED, None, loaded=loaded)
    if not isinstance(entry, Entry):
        return entry
    if not _is_expired(entry, now_ms):
        return _transition_refusal(entry, "expire")
    assert entry.expires_at_ms is not None
    payload = ev.BillingReserveExpired(entry.account_id, entry.estimated_cost_micro, entry.expires_at_ms)
    return Write(entry.billing_entry_id, (payload,), entry.correlation_id)


# -- direct charge, admin and settlement outcomes, credits ---------------------------------


def _charge(state: State, c: cmd.Charge, now_ms: int, policy: Policy, new_id: NewId, *, loaded: Loads) -> Decision:
    fingerprint = f"charge:{c.amount_micro}:{c.allow_partial}"
    known = _known_request(state, c.account_id, c.request_id, fingerprint, loaded)
    if known is not None:
        return known if isinstance(known, Refusal | Fetch) else _replay(known, state)
    refusal = _amount_limit(c.amount_micro, policy, "amount_micro")
    if refusal is None and not policy.holds_allowed:
        refusal = _refuse(RefusalCode.GUARD_UNAVAILABLE, "the conservation guard is not ready", retry_after_seconds=30)
    if refusal is not None:
        return refusal
    available = state.account(c.account_id).available_micro
    charged = min(available, c.amount_micro) if c.allow_partial else c.amount_micro
    if charged > available or (charged == 0 and c.amount_micro > 0):
        return _insufficient(available, c.amount_micro, policy.credit_units_per_usd)
    payload = ev.BillingCharge(
        c.account_id,
        c.request_id,
        c.amount_micro,
        charged,
        c.allow_partial,
        policy.finalize,
        policy.rate(now_ms),
        fingerprint,
    )
    return Write(new_id(), (payload,), c.correlation_id, created=True)


_SETTLE_TARGET = {cmd.Void: S.VOIDED, cmd.FinalizeAck: S.FINALIZE_ACKED, cmd.FinalizeFail: S.FINALIZE_FAILED}
_SETTLE_VERB = {cmd.Void: "void", cmd.FinalizeAck: "finalize", cmd.FinalizeFail: "fail"}


def _repeated_settle(state: State, entry: Entry, c: cmd.Void | cmd.FinalizeAck | cmd.FinalizeFail) -> Decision | None:
    return _replay(entry, state) if entry.state is _SETTLE_TARGET[type(c)] else None


def _settle(state: State, c: cmd.Void | cmd.FinalizeAck | cmd.FinalizeFail, loaded: Loads) -> Decision:
    verb, target = _SETTLE_VERB[type(c)], _SETTLE_TARGET[type(c)]
    entry = _find(state, c, verb, target, None, loaded=loaded, repeat=_repeated_settle)
    if not isinstance(entry, Entry):
        return entry
    payload: ev.Payload
    if isinstance(c, cmd.Void):
        if not c.reason or not c.admin_id:
            return _invalid("a void needs a reason and an admin_id", "reason")
        payload = ev.BillingVoid(entry.account_id, entry.charged_micro, c.reason, c.admin_id, entry.state.value)
    elif isinstance(c, cmd.FinalizeAck):
        payload = ev.BillingFinalizeAck(entry.account_id, entry.charged_micro, c.source, c.attempt, entry.state.value)
    else:
        payload = ev.BillingFinalizeFail(entry.account_id, entry.charged_micro, c.reason, c.attempts)
    return Write(entry.billing_entry_id, (payload,), entry.correlation_id)


_CREDIT_EVENT = {
    cmd.CreditKind.MINT: ev.CreditMint.EVENT_TYPE,
    cmd.CreditKind.DEDUCT: ev.CreditDeduct.EVENT_TYPE,
    cmd.CreditKind.CREDIT_NOTE: ev.X402CreditNote.EVENT_TYPE,
}


def _credit_matches(record: CreditRecord, event_type: str, c: cmd.Credit) -> bool:
    """Whether ``c`` repeats the credit ``record`` keeps: every field of it the same.

    A record from before reasons and payments were part of the key (``event:amount``, in an
    older snapshot) is matched on what it kept.
    """
    if record.fingerprint.count(":") == 1:
        return record.fingerprint == f"{event_type}:{c.amount_micro}"
    return record.fingerprint == credit_fingerprint(event_type, c.amount_micro, c.paid_micro_usdc, c.reason)


def _payment_mismatch(c: cmd.Credit, policy: Policy) -> Refusal | None:
    """A payment must be a mint's, and the mint must credit exactly what it converts to (SPEC §3)."""
    if c.paid_micro_usdc is None:
        return None
    if c.kind is not cmd.CreditKind.MINT:
        return _invalid("paid_micro_usdc belongs to a mint only", "paid_micro_usdc")
    converted = usdc_to_usd_micro(c.paid_micro_usdc, policy.usd_usdc_rate_ppm)
    if c.amount_micro != converted:
        return _refuse(
            RefusalCode.INVALID_REQUEST,
            f"amount_micro {c.amount_micro} does not match the payment: {c.paid_micro_usdc} micro-USDC at "
            f"usd_usdc_rate_ppm {policy.usd_usdc_rate_ppm} is {converted} micro-USD",
            field="amount_micro",
            paid_micro_usdc=c.paid_micro_usdc,
            usd_usdc_rate_ppm=policy.usd_usdc_rate_ppm,
            converted_micro=converted,
        )
    return None


def _credit(state: State, c: cmd.Credit, policy: Policy, new_id: NewId) -> Decision:
    event_type = _CREDIT_EVENT[c.kind]
    record = state.credits.get(request_key(c.account_id, c.credit_id))
    if record is not None:
        if not _credit_matches(record, event_type, c):
            return _refuse(RefusalCode.IDEMPOTENCY_KEY_REUSED, "credit_id was used before with different parameters")
        result = cmd.CreditResult(
            c.account_id, c.credit_id, c.kind, c.amount_micro, record.wal_sequence, state.account(c.account_id), True
        )
        return Replay(result, record.wal_sequence)
    if c.amount_micro <= 0:
        return _invalid("amount_micro must be positive", "amount_micro")
    mismatch = _payment_mismatch(c, policy)
    if mismatch is not None:
        return mismatch
    account = state.account(c.account_id)
    if c.kind is cmd.CreditKind.DEDUCT:
        if account.available_micro < c.amount_micro:
            return _insufficient(account.available_micro, c.amount_micro, policy.credit_units_per_usd)
        payload: ev.Payload = ev.CreditDeduct(c.account_id, c.credit_id, c.amount_micro, c.reason)
        return Write(new_id(), (payload,), c.correlation_id, created=True)
    total_out = -(state.funding_micro + state.credit_notes_micro)
    if account.available_micro + c.amount_micro > INT64_MAX or total_out + c.amount_micro > INT64_MAX:
        return _invalid("the credit would overflow a 64-bit balance", "amount_micro")
    if c.kind is cmd.CreditKind.MINT:
        payload = ev.CreditMint(
            c.account_id, c.credit_id, c.amount_micro, c.paid_micro_usdc, policy.usd_usdc_rate_ppm, c.reason
        )
    else:
        payload = ev.X402CreditNote(c.account_id, c.credit_id, c.amount_micro, c.reason)
    return Write(new_id(), (payload,), c.correlation_id, created=True)
