"""Account endpoints: balance (micro-USD and CU), entry history with cursor paging, credits.

Reads answer once what they show is durable (the engine's ``read_balance`` / ``wait_durable``),
so a balance never shows money that a crash could take back. History pages over the engine's
in-memory entries in id (creation) order; the cursor is the last id of the previous page.
"""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from tollway.api.auth import Scope
from tollway.api.context import Admin, Reader, context
from tollway.api.errors import errors_doc, refusal_response
from tollway.api.schemas import (
    ACCOUNT_PATTERN,
    ULID_PATTERN,
    BalanceOut,
    CreditOut,
    CreditRequest,
    EntryPageOut,
    EntryStateName,
)
from tollway.api.translate import credit_command, entries_page
from tollway.api.wire import balance_body, credit_body, entry_body, json_response
from tollway.core import commands as cmd
from tollway.core.ids import check_account_id
from tollway.core.lifecycle import EntryState
from tollway.engine import Engine

ENTRY_PAGE_LIMIT_DEFAULT: Final = 100
ENTRY_PAGE_LIMIT_MAX: Final = 1000

router = APIRouter(tags=["accounts"])

AccountId = Annotated[str, Path(description="the account id", pattern=ACCOUNT_PATTERN)]


@router.get(
    "/v1/accounts/{account_id}",
    response_model=BalanceOut,
    summary="An account's balances",
    responses=errors_doc(),
)
async def get_account(account_id: AccountId, principal: Reader, request: Request) -> Response:
    """Available, held, unsettled and charged, in micro-USD and credit units.

    An account no credit or entry ever touched answers zeros with ``exists: false``.
    """
    check_account_id(account_id)
    principal.require(Scope.READ, account_id)
    engine = context(request).engine
    account = await engine.read_balance(account_id)
    exists = account_id in engine.state.accounts
    rate = engine.policy.credit_units_per_usd
    return json_response(balance_body(account_id, account, rate, engine.durable_sequence, exists=exists))


@router.get(
    "/v1/accounts/{account_id}/entries",
    response_model=EntryPageOut,
    summary="An account's entries, oldest first",
    responses=errors_doc(),
)
async def list_entries(
    *,
    account_id: AccountId,
    principal: Reader,
    request: Request,
    state: Annotated[list[EntryStateName] | None, Query(description="only these states (repeatable)")] = None,
    cursor: Annotated[str | None, Query(pattern=ULID_PATTERN, description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=ENTRY_PAGE_LIMIT_MAX)] = ENTRY_PAGE_LIMIT_DEFAULT,
) -> Response:
    """One page of the account's entries, filtered by state, in id (creation) order."""
    check_account_id(account_id)
    principal.require(Scope.READ, account_id)
    states = frozenset(EntryState(name) for name in state or ())
    return json_response(await history_page(context(request).engine, account_id, states, cursor, limit))


async def history_page(
    engine: Engine, account_id: str, states: frozenset[EntryState], cursor: str | None, limit: int
) -> dict[str, object]:
    """One page of an account's entries (settled ones read back from the log) and the next cursor."""
    page, next_cursor = entries_page(engine.state, account_id, states, cursor, limit)
    items = []
    for entry_id in page:
        found = await engine.read_entry(entry_id)
        # None: archived since the page was chosen; another account: its hash matched (the page is one shorter)
        if found is not None and found[0].account_id == account_id:
            items.append(entry_body(found[0], response_json=found[1]))
    return {"items": items, "next_cursor": next_cursor}


@router.post(
    "/v1/accounts/{account_id}/credits",
    status_code=201,
    response_model=CreditOut,
    summary="Mint, deduct or credit-note an amount — admin",
    responses={
        200: {"model": CreditOut, "description": "a repeat of the same credit_id: the original result"},
        **errors_doc("insufficient_funds", "idempotency_key_reused"),
    },
)
async def create_credit(account_id: AccountId, body: CreditRequest, principal: Admin, request: Request) -> Response:
    """Idempotent on ``credit_id``: the same id and amount answers the original result (``replayed``)."""
    check_account_id(account_id)
    principal.require(Scope.ADMIN, account_id)
    engine = context(request).engine
    outcome = await engine.execute(credit_command(account_id, body))
    if isinstance(outcome, cmd.Refusal):
        return refusal_response(outcome)
    assert isinstance(outcome, cmd.CreditResult)
    return json_response(credit_body(outcome, engine.policy.credit_units_per_usd), 200 if outcome.replayed else 201)
