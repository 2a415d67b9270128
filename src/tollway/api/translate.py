"""Parsed requests → engine commands, and the account history query.

The schemas have already checked the *shape* of a body; this module gives it meaning: which of
the two forms of a reserve or commit was used (an amount, or a model with token counts priced
by the :class:`~tollway.core.pricing.PriceTable`), and what command the engine gets. Mistakes a
schema cannot express (both forms at once, a missing token count, an unknown model) raise
:class:`~tollway.core.errors.InvalidInput` naming the field — 400 through the error table.

A reserve priced from a model records how it was priced in the command's ``basis``, so
repeating the request with other token counts is a reused idempotency key, and a commit by
tokens can price the actual cost with the hold's model.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection
from typing import Final

import msgspec

from tollway.api.schemas import ChargeRequest, CommitRequest, CreditRequest, ReserveRequest
from tollway.core import commands as cmd
from tollway.core.errors import InvalidInput
from tollway.core.ids import UNTRACED
from tollway.core.lifecycle import EntryState
from tollway.core.pricing import PriceTable, estimate_basis
from tollway.core.state import Entry, State

_BASIS_MODEL: Final = "model="
_BASIS_INPUT: Final = ";input_tokens="


def _missing(field: str, form: str) -> InvalidInput:
    return InvalidInput(f"{field} is required when {form}", field=field)


def reserve_command(body: ReserveRequest, pricing: PriceTable) -> cmd.Reserve:
    """The reserve a body asks for: by amount, or by model and token counts."""
    correlation = body.correlation_id or UNTRACED
    by_tokens = (body.model, body.input_tokens, body.max_output_tokens)
    if body.estimated_cost_micro is not None:
        if any(value is not None for value in by_tokens):
            raise InvalidInput(
                "give estimated_cost_micro, or model with input_tokens and max_output_tokens, not both",
                field="estimated_cost_micro",
            )
        return cmd.Reserve(body.account_id, body.request_id, body.estimated_cost_micro, body.ttl_s, correlation)
    if body.model is None:
        raise InvalidInput(
            "give estimated_cost_micro, or model with input_tokens and max_output_tokens", field="estimated_cost_micro"
        )
    if body.input_tokens is None:
        raise _missing("input_tokens", "pricing by model")
    if body.max_output_tokens is None:
        raise _missing("max_output_tokens", "pricing by model")
    estimate = pricing.estimate(body.model, body.input_tokens, body.max_output_tokens)
    basis = estimate_basis(body.model, body.input_tokens, body.max_output_tokens)
    return cmd.Reserve(body.account_id, body.request_id, estimate, body.ttl_s, correlation, basis)


def reserved_model(entry: Entry) -> str | None:
    """The model a hold was priced with, read back from its fingerprint (None: priced by amount)."""
    _, _, basis = entry.fingerprint.partition(":")[2].partition(":")
    if not basis.startswith(_BASIS_MODEL) or _BASIS_INPUT not in basis:
        return None
    return basis[len(_BASIS_MODEL) :].rsplit(_BASIS_INPUT, 1)[0]


def commit_command(billing_entry_id: str, body: CommitRequest, entry: Entry | None, pricing: PriceTable) -> cmd.Commit:
    """The commit a body asks for: by amount, or by token counts priced with the hold's model."""
    response_json = None if body.response is None else msgspec.json.encode(body.response).decode()
    by_tokens = (body.model, body.input_tokens, body.output_tokens)
    if body.actual_cost_micro is not None:
        if any(value is not None for value in by_tokens):
            raise InvalidInput(
                "give actual_cost_micro, or input_tokens and output_tokens, not both", field="actual_cost_micro"
            )
        return cmd.Commit(billing_entry_id, body.actual_cost_micro, response_json)
    if body.input_tokens is None and body.output_tokens is None:
        raise InvalidInput("give actual_cost_micro, or input_tokens and output_tokens", field="actual_cost_micro")
    if body.input_tokens is None:
        raise _missing("input_tokens", "committing by tokens")
    if body.output_tokens is None:
        raise _missing("output_tokens", "committing by tokens")
    model = body.model or (reserved_model(entry) if entry is not None else None)
    if model is None:
        raise InvalidInput("model is required: the hold was not priced by model", field="model")
    actual = pricing.actual(model, body.input_tokens, body.output_tokens)
    return cmd.Commit(billing_entry_id, actual, response_json)


def charge_command(body: ChargeRequest) -> cmd.Charge:
    """A direct charge."""
    return cmd.Charge(
        body.account_id, body.request_id, body.amount_micro, body.allow_partial, body.correlation_id or UNTRACED
    )


def credit_command(account_id: str, body: CreditRequest) -> cmd.Credit:
    """A mint, deduct or credit note on ``account_id``."""
    return cmd.Credit(
        account_id,
        body.credit_id,
        cmd.CreditKind(body.kind),
        body.amount_micro,
        body.reason,
        body.paid_micro_usdc,
        body.correlation_id or UNTRACED,
    )


def entries_page(
    state: State, account_id: str, states: Collection[EntryState], after: str | None, limit: int
) -> tuple[list[str], str | None]:
    """The ids of up to ``limit`` entries of ``account_id`` with id > ``after``, in id order, and the next cursor.

    Whole entries and settled entries' idempotency records alike (a settled entry is then read
    back from the log). Neither is indexed by account: a page is one scan of them
    (``O(entries within the retention)``, about 0.1 µs each), bounded in what it returns by ``limit``.
    """
    live = (
        entry_id
        for entry_id, entry in state.entries.items()
        if entry.account_id == account_id and (not states or entry.state in states)
    )
    settled = (  # by a hash of the account: the caller drops what the entry read back shows is another's
        entry_id for entry_id, state_now in state.settled.of_account(account_id) if not states or state_now in states
    )
    matching = (entry_id for entry_id in itertools.chain(live, settled) if after is None or entry_id > after)
    found = heapq.nsmallest(limit + 1, matching)
    page = found[:limit]
    return page, page[-1] if len(found) > limit else None
