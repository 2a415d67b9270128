"""Billing endpoints: reservations (create, get, commit, release, extend), direct charges, entries.

Each handler is the same four steps: check the caller's scope and account, translate the body
into a command, ``await engine.execute(command)``, and encode the outcome — an entry (201 when
it was just created, 200 otherwise, ``replayed`` on an idempotent repeat) or a refusal through
the error table. Nothing here decides anything about money.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from tollway.api.auth import Scope
from tollway.api.context import Admin, Gateway, Reader, context
from tollway.api.errors import ApiError, errors_doc, refusal_response
from tollway.api.schemas import (
    ChargeRequest,
    CommitRequest,
    EntryOut,
    ExtendRequest,
    ReleaseRequest,
    ReserveRequest,
    VoidRequest,
)
from tollway.api.translate import charge_command, commit_command, reserve_command
from tollway.api.wire import entry_body, json_response
from tollway.core import commands as cmd
from tollway.core.ids import check_entry_id

router = APIRouter()

EntryId = Annotated[str, Path(description="the billing entry id (a ULID)", examples=["01JH0000000000000000000000"])]


def entry_outcome(outcome: cmd.Outcome) -> Response:
    """201 for a new entry, 200 for any other entry result, the error table for a refusal."""
    if isinstance(outcome, cmd.Refusal):
        return refusal_response(outcome)
    assert isinstance(outcome, cmd.EntryResult)
    body = entry_body(outcome.entry, replayed=outcome.replayed, response_json=outcome.response_json)
    return json_response(body, 201 if outcome.created else 200)


_ENTRY_200: dict[int | str, dict[str, Any]] = {
    200: {"model": EntryOut, "description": "the entry after the operation (or its idempotent repeat)"}
}


@router.post(
    "/v1/reservations",
    tags=["reservations"],
    status_code=201,
    response_model=EntryOut,
    summary="Reserve (hold) the worst-case cost of a model call",
    responses={
        200: {"model": EntryOut, "description": "a repeat after completion: the stored entry and response"},
        **errors_doc("insufficient_funds", "request_in_progress", "idempotency_key_reused", "guard"),
    },
)
async def create_reservation(body: ReserveRequest, principal: Gateway, request: Request) -> Response:
    """Hold ``estimated_cost_micro`` (or the estimate of ``model`` for the token counts), keyed by ``request_id``."""
    principal.require(Scope.GATEWAY, body.account_id)
    ctx = context(request)
    return entry_outcome(await ctx.engine.execute(reserve_command(body, ctx.pricing)))


@router.get(
    "/v1/reservations/{billing_entry_id}",
    tags=["reservations"],
    response_model=EntryOut,
    summary="Get an entry",
    responses=errors_doc("not_found"),
)
async def get_reservation(billing_entry_id: EntryId, principal: Reader, request: Request) -> Response:
    """The entry, once the state it reflects is durable, with its stored response if any."""
    ctx = context(request)
    check_entry_id(billing_entry_id)
    entry = await ctx.engine.get_entry(billing_entry_id)
    if entry is None:
        raise ApiError("not_found", f"no billing entry {billing_entry_id}", billing_entry_id=billing_entry_id)
    principal.require(Scope.READ, entry.account_id)
    response_json = ctx.engine.state.responses.get(billing_entry_id)
    return json_response(entry_body(entry, response_json=response_json))


@router.post(
    "/v1/reservations/{billing_entry_id}/commit",
    tags=["reservations"],
    response_model=EntryOut,
    summary="Commit the actual cost of a hold",
    responses=errors_doc("not_found", "invalid_transition", "reservation_expired"),
)
async def commit_reservation(
    billing_entry_id: EntryId, body: CommitRequest, principal: Gateway, request: Request
) -> Response:
    """Charge ``actual_cost_micro`` (or the price of the token counts); optionally store ``response``."""
    ctx = context(request)
    entry = ctx.entry_for(principal, Scope.GATEWAY, billing_entry_id)
    return entry_outcome(await ctx.engine.execute(commit_command(billing_entry_id, body, entry, ctx.pricing)))


@router.post(
    "/v1/reservations/{billing_entry_id}/release",
    tags=["reservations"],
    response_model=EntryOut,
    summary="Release a hold",
    responses=errors_doc("not_found", "invalid_transition", "reservation_expired"),
)
async def release_reservation(
    billing_entry_id: EntryId, body: ReleaseRequest, principal: Gateway, request: Request
) -> Response:
    """Return the hold to available: the call failed before streaming, or the user cancelled."""
    ctx = context(request)
    ctx.entry_for(principal, Scope.GATEWAY, billing_entry_id)
    return entry_outcome(await ctx.engine.execute(cmd.Release(billing_entry_id, body.reason)))


@router.post(
    "/v1/reservations/{billing_entry_id}/extend",
    tags=["reservations"],
    response_model=EntryOut,
    summary="Extend a hold's expiry",
    responses=errors_doc("not_found", "invalid_transition", "reservation_expired"),
)
async def extend_reservation(
    billing_entry_id: EntryId, body: ExtendRequest, principal: Gateway, request: Request
) -> Response:
    """Push ``expires_at_ms`` to ``ttl_s`` seconds from now, for long streams (never shortens it)."""
    ctx = context(request)
    ctx.entry_for(principal, Scope.GATEWAY, billing_entry_id)
    return entry_outcome(await ctx.engine.execute(cmd.Extend(billing_entry_id, body.ttl_s)))


@router.post(
    "/v1/charges",
    tags=["charges"],
    status_code=201,
    response_model=EntryOut,
    summary="Charge without a hold",
    responses={**_ENTRY_200, **errors_doc("insufficient_funds", "idempotency_key_reused", "guard")},
)
async def create_charge(body: ChargeRequest, principal: Gateway, request: Request) -> Response:
    """All-or-nothing against available (or clamped with ``allow_partial``), keyed by ``request_id``."""
    principal.require(Scope.GATEWAY, body.account_id)
    return entry_outcome(await context(request).engine.execute(charge_command(body)))


@router.post(
    "/v1/entries/{billing_entry_id}/void",
    tags=["entries"],
    response_model=EntryOut,
    summary="Void (refund) a charge — admin",
    responses=errors_doc("not_found", "invalid_transition"),
)
async def void_entry(billing_entry_id: EntryId, body: VoidRequest, principal: Admin, request: Request) -> Response:
    """Refund a committed (or settlement-failed) charge; the token's subject is recorded as ``admin_id``."""
    ctx = context(request)
    ctx.entry_for(principal, Scope.ADMIN, billing_entry_id)
    return entry_outcome(await ctx.engine.execute(cmd.Void(billing_entry_id, body.reason, principal.subject)))


@router.post(
    "/v1/entries/{billing_entry_id}/finalize",
    tags=["entries"],
    response_model=EntryOut,
    summary="Mark a charge as settled by hand — admin",
    responses=errors_doc("not_found", "invalid_transition"),
)
async def finalize_entry(billing_entry_id: EntryId, principal: Admin, request: Request) -> Response:
    """Manual finalize ack (``source: admin``) of a ``FINALIZE_PENDING`` or ``FINALIZE_FAILED`` charge."""
    ctx = context(request)
    ctx.entry_for(principal, Scope.ADMIN, billing_entry_id)
    return entry_outcome(await ctx.engine.execute(cmd.FinalizeAck(billing_entry_id, source="admin")))
