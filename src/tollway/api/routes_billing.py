"""Billing endpoints: reservations (create, get, commit, release, extend), direct charges, entries.

Each handler is the same four steps: check the caller's scope and account, translate the body
into a command, ``await engine.execute(command)``, and encode the outcome — an entry (201 when
it was just created, 200 otherwise, ``replayed`` on an idempotent repeat) or a refusal through
the error table. Nothing here decides anything about money.

The gateway's routes (reserve, commit, release, extend, charge) keep their middle steps in the
``*_command_of`` functions of :data:`GATEWAY_COMMANDS`: the handlers below call them, and so does
the hot path (:mod:`tollway.api.hot`), which answers those routes without FastAPI's per-request
machinery — one definition of what each route asks of the engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel
from starlette.responses import Response

from tollway.api.auth import Principal, Scope
from tollway.api.context import Admin, AppContext, Gateway, Reader, context
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
from tollway.core.decide import GONE
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


# -- what the gateway's routes ask of the engine (shared with the hot path) ---------------------
#
# Each checks the caller's account (the scope was checked with the token) and builds the command;
# a check that fails raises ApiError or InvalidInput before anything is executed.


async def reserve_command_of(ctx: AppContext, principal: Principal, body: ReserveRequest, _: str) -> cmd.Command:
    """POST /v1/reservations."""
    principal.require(Scope.GATEWAY, body.account_id)
    return reserve_command(body, ctx.pricing)


async def commit_command_of(
    ctx: AppContext, principal: Principal, body: CommitRequest, billing_entry_id: str
) -> cmd.Command:
    """POST /v1/reservations/{billing_entry_id}/commit."""
    entry = await ctx.entry_for(principal, Scope.GATEWAY, billing_entry_id)
    return commit_command(billing_entry_id, body, entry, ctx.pricing)


async def release_command_of(
    ctx: AppContext, principal: Principal, body: ReleaseRequest, billing_entry_id: str
) -> cmd.Command:
    """POST /v1/reservations/{billing_entry_id}/release."""
    await ctx.entry_for(principal, Scope.GATEWAY, billing_entry_id)
    return cmd.Release(billing_entry_id, body.reason)


async def extend_command_of(
    ctx: AppContext, principal: Principal, body: ExtendRequest, billing_entry_id: str
) -> cmd.Command:
    """POST /v1/reservations/{billing_entry_id}/extend."""
    await ctx.entry_for(principal, Scope.GATEWAY, billing_entry_id)
    return cmd.Extend(billing_entry_id, body.ttl_s)


async def charge_command_of(_: AppContext, principal: Principal, body: ChargeRequest, __: str) -> cmd.Command:
    """POST /v1/charges."""
    principal.require(Scope.GATEWAY, body.account_id)
    return charge_command(body)


GatewayCommand = Callable[[AppContext, Principal, Any, str], Awaitable[cmd.Command]]

GATEWAY_COMMANDS: Final[Mapping[str, tuple[type[BaseModel], GatewayCommand]]] = {
    "reserve": (ReserveRequest, reserve_command_of),
    "commit": (CommitRequest, commit_command_of),
    "release": (ReleaseRequest, release_command_of),
    "extend": (ExtendRequest, extend_command_of),
    "charge": (ChargeRequest, charge_command_of),
}
"""The gateway's routes by name: the body model and the command builder (the entry id, or "")."""


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
    ctx = context(request)
    return entry_outcome(await ctx.engine.execute(await reserve_command_of(ctx, principal, body, "")))


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
    found = await ctx.engine.read_entry(billing_entry_id)
    if found is None:
        raise ApiError("not_found", f"no billing entry {billing_entry_id}{GONE}", billing_entry_id=billing_entry_id)
    entry, response_json = found
    principal.require(Scope.READ, entry.account_id)
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
    return entry_outcome(await ctx.engine.execute(await commit_command_of(ctx, principal, body, billing_entry_id)))


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
    return entry_outcome(await ctx.engine.execute(await release_command_of(ctx, principal, body, billing_entry_id)))


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
    return entry_outcome(await ctx.engine.execute(await extend_command_of(ctx, principal, body, billing_entry_id)))


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
    ctx = context(request)
    return entry_outcome(await ctx.engine.execute(await charge_command_of(ctx, principal, body, "")))


@router.post(
    "/v1/entries/{billing_entry_id}/void",
    tags=["entries"],
    response_model=EntryOut,
    summary="Void (refund) a charge — admin",
    responses=errors_doc("not_found", "invalid_transition", "settlement_call_in_flight"),
)
async def void_entry(billing_entry_id: EntryId, body: VoidRequest, principal: Admin, request: Request) -> Response:
    """Refund a committed (or settlement-failed) charge; the token's subject is recorded as ``admin_id``.

    Refused (409 ``settlement_call_in_flight``) while the finalize worker is calling settlement for
    the entry, so a refund never races a settlement that is confirming the charge; retry shortly.
    """
    ctx = context(request)
    await ctx.entry_for(principal, Scope.ADMIN, billing_entry_id)
    worker = ctx.service.worker
    if worker is not None and billing_entry_id in worker.in_flight:
        raise ApiError(
            "settlement_call_in_flight",
            "settlement is being called for this entry right now; retry the void once the call ends",
            billing_entry_id=billing_entry_id,
        )
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
    await ctx.entry_for(principal, Scope.ADMIN, billing_entry_id)
    return entry_outcome(await ctx.engine.execute(cmd.FinalizeAck(billing_entry_id, source="admin")))
