"""Form checks for commands: ids, amounts and free text, before any decision is made.

A command that fails here raises :class:`~tollway.core.errors.InvalidInput` naming the field;
nothing is decided and nothing is written. Whether a well-formed command can be *done* is the
business of :mod:`tollway.core.decide`.
"""

from __future__ import annotations

from typing import Final

from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.errors import InvalidInput
from tollway.core.ids import check_account_id, check_correlation_id, check_entry_id, check_request_id
from tollway.core.money import check_micro

MAX_TEXT_LENGTH: Final = 1024
"""Longest reason, admin id or note text accepted."""
ARCHIVE_LIMIT_MAX: Final = 1000
"""Most entries one ``entries_archived`` event may list (a record of about 130 KB)."""
NOTE_PAYLOADS: Final = (ev.Audit, ev.BillingReconciliation, ev.RequestStart)
"""The only events a :class:`~tollway.core.commands.Note` may record: none of them moves money."""


def _text(value: str, field: str, *, required: bool = True) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT_LENGTH or (required and not value.strip()):
        raise InvalidInput(
            f"{field} must be {'a non-empty' if required else 'a'} string of at most {MAX_TEXT_LENGTH} characters",
            field=field,
        )


def _count(value: int | None, field: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidInput(f"{field} must be a non-negative integer", field=field)


def _archive_bounds(command: cmd.Archive) -> None:
    _count(command.older_than_ms, "older_than_ms")
    limit = command.limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= ARCHIVE_LIMIT_MAX:
        raise InvalidInput(f"limit must be an integer between 1 and {ARCHIVE_LIMIT_MAX}", field="limit")


def validate(command: cmd.Command) -> None:  # noqa: C901, PLR0912 - one flat case per command type
    """Raise :class:`InvalidInput` if ``command`` is malformed."""
    match command:
        case cmd.Reserve():
            check_account_id(command.account_id)
            check_request_id(command.request_id)
            check_micro(command.estimated_cost_micro, field="estimated_cost_micro")
            _count(command.ttl_s, "ttl_s")
            check_correlation_id(command.correlation_id)
            _text(command.basis, "basis", required=False)
        case cmd.Commit():
            check_entry_id(command.billing_entry_id)
            check_micro(command.actual_cost_micro, field="actual_cost_micro")
        case cmd.Release() | cmd.Expire() | cmd.Extend():
            check_entry_id(command.billing_entry_id)
            if isinstance(command, cmd.Extend):
                _count(command.ttl_s, "ttl_s")
        case cmd.Charge():
            check_account_id(command.account_id)
            check_request_id(command.request_id)
            check_micro(command.amount_micro, field="amount_micro")
            check_correlation_id(command.correlation_id)
        case cmd.Void():
            check_entry_id(command.billing_entry_id)
            _text(command.reason, "reason")
            _text(command.admin_id, "admin_id")
        case cmd.FinalizeAck() | cmd.FinalizeFail():
            check_entry_id(command.billing_entry_id)
            _count(command.attempt if isinstance(command, cmd.FinalizeAck) else command.attempts, "attempts")
        case cmd.Credit():
            check_account_id(command.account_id)
            check_request_id(command.credit_id, field="credit_id")
            check_micro(command.amount_micro)
            if command.paid_micro_usdc is not None:
                check_micro(command.paid_micro_usdc, field="paid_micro_usdc")
            _text(command.reason, "reason", required=False)
        case cmd.Archive():
            _archive_bounds(command)
        case cmd.Note():
            if not isinstance(command.payload, NOTE_PAYLOADS):
                raise InvalidInput(
                    "a note records audit information only; money moves through commands", field="payload"
                )
            check_correlation_id(command.correlation_id)
            if command.billing_entry_id is not None:
                check_entry_id(command.billing_entry_id)
