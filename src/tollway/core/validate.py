"""Form checks for commands: types, ids, amounts and free text, before any decision is made.

A command that fails here raises :class:`~tollway.core.errors.InvalidInput` naming the field;
nothing is decided and nothing is written. :func:`validate` returns the command as it will be
recorded: every field of the type its record declares (msgspec checks them: a float or a bool
is not an amount, ``None`` is not a string), an absent correlation id filled in as
``untraced``. Whatever passes here can be written to the log and read back by recovery; the
codec still refuses a record over its size limit (:data:`tollway.wal.codec.MAX_RECORD_BYTES`).
Whether a well-formed command can be *done* is the business of :mod:`tollway.core.decide`.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.errors import InvalidInput
from tollway.core.ids import UNTRACED, check_account_id, check_correlation_id, check_entry_id, check_request_id
from tollway.core.money import INT64_MAX, check_micro

MAX_TEXT_LENGTH: Final = 1024
"""Longest reason, admin id or note text accepted."""
ARCHIVE_LIMIT_MAX: Final = 1000
"""Most entries one ``entries_archived`` event may list (a record of about 130 KB)."""
NOTE_PAYLOADS: Final = (ev.Audit, ev.BillingReconciliation, ev.RequestStart)
"""The only events a :class:`~tollway.core.commands.Note` may record: none of them moves money."""


_FIELD_PATH: Final = re.compile(r"`\$\.([A-Za-z_]+)")


def _encodable(value: str) -> bool:
    """Whether ``value`` has a UTF-8 form (a lone surrogate has none: the log could not hold it)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(value: str, field: str, *, required: bool = True) -> None:
    if (
        not isinstance(value, str)
        or len(value) > MAX_TEXT_LENGTH
        or (required and not value.strip())
        or not _encodable(value)
    ):
        raise InvalidInput(
            f"{field} must be {'a non-empty' if required else 'a'} string of at most {MAX_TEXT_LENGTH} characters",
            field=field,
        )


def _count(value: int | None, field: str) -> None:
    if value is not None and (type(value) is not int or not 0 <= value <= INT64_MAX):
        raise InvalidInput(f"{field} must be an integer from 0 to {INT64_MAX}", field=field)


def _typed(record: msgspec.Struct) -> msgspec.Struct:
    """``record`` rebuilt with every field checked against its declared type (strict: no coercion)."""
    fields = msgspec.structs.asdict(record)
    if "correlation_id" in fields and fields["correlation_id"] in (None, ""):
        fields["correlation_id"] = UNTRACED
    payload = _typed(record.payload) if isinstance(record, cmd.Note) else None
    if payload is not None:
        fields["payload"] = {}  # checked on its own, as its own type
    try:
        typed = msgspec.convert(fields, type(record), strict=True)
    except msgspec.ValidationError as exc:
        found = _FIELD_PATH.search(str(exc))
        field = found.group(1) if found else None
        raise InvalidInput(f"{type(record).__name__}: {exc}", field=field) from exc
    except UnicodeEncodeError as exc:  # msgspec met a lone surrogate where another type belongs
        raise InvalidInput(f"{type(record).__name__}: a field is not valid Unicode text") from exc
    return typed if payload is None else msgspec.structs.replace(typed, payload=payload)


def _archive_bounds(command: cmd.Archive) -> None:
    _count(command.older_than_ms, "older_than_ms")
    limit = command.limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= ARCHIVE_LIMIT_MAX:
        raise InvalidInput(f"limit must be an integer between 1 and {ARCHIVE_LIMIT_MAX}", field="limit")


def validate(command: cmd.Command) -> cmd.Command:
    """The command as it will be recorded; raises :class:`InvalidInput` if it is malformed."""
    if isinstance(command, cmd.Note) and not isinstance(command.payload, NOTE_PAYLOADS):
        raise InvalidInput("a note records audit information only; money moves through commands", field="payload")
    typed: cmd.Command = _typed(command)  # type: ignore[assignment]
    _check(typed)
    return typed


def _check(command: cmd.Command) -> None:
    """The rules beyond types: ids, amounts, lengths."""
    match command:
        case cmd.Reserve() | cmd.Charge():
            check_account_id(command.account_id)
            check_request_id(command.request_id)
            if isinstance(command, cmd.Reserve):
                check_micro(command.estimated_cost_micro, field="estimated_cost_micro")
                _count(command.ttl_s, "ttl_s")
                _text(command.basis, "basis", required=False)
            else:
                check_micro(command.amount_micro, field="amount_micro")
            check_correlation_id(command.correlation_id)
        case cmd.Credit():
            check_account_id(command.account_id)
            check_request_id(command.credit_id, field="credit_id")
            check_micro(command.amount_micro)
            if command.paid_micro_usdc is not None:
                check_micro(command.paid_micro_usdc, field="paid_micro_usdc")
            _text(command.reason, "reason", required=False)
            check_correlation_id(command.correlation_id)
        case cmd.Archive():
            _archive_bounds(command)
        case cmd.Note():
            for name, value in msgspec.structs.asdict(command.payload).items():
                _text(value, name, required=False)
            check_correlation_id(command.correlation_id)
            if command.billing_entry_id is not None:
                check_entry_id(command.billing_entry_id)
        case _:
            check_entry_id(command.billing_entry_id)
            _check_entry_verb(command)


def _check_entry_verb(command: cmd.Command) -> None:
    """The rules of the commands on one existing entry, beyond its id."""
    match command:
        case cmd.Commit():
            check_micro(command.actual_cost_micro, field="actual_cost_micro")
            if command.response_json is not None and not _encodable(command.response_json):
                raise InvalidInput("response must be valid Unicode text", field="response")
        case cmd.Extend():
            _count(command.ttl_s, "ttl_s")
        case cmd.Release():
            _text(command.reason, "reason")
        case cmd.Void():
            _text(command.reason, "reason")
            _text(command.admin_id, "admin_id")
        case cmd.FinalizeAck():
            _text(command.source, "source")
            _count(command.attempt, "attempt")
        case cmd.FinalizeFail():
            _text(command.reason, "reason")
            _count(command.attempts, "attempts")
