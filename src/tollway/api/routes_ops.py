"""Operations endpoints: settlement (dead letters, bulk replay, breaker), guard, prices, health.

Settlement operations need the finalize worker, which exists only in settlement mode; in
standalone mode they answer 409 ``settlement_not_configured`` (the dead-letter list still
answers — it is simply empty). ``/readyz`` is 200 while new holds are allowed (the conservation
guard is ready or bypassed) and 503 otherwise; either way its body shows the guard, the
breaker, the WAL's sequences, the projection's lag, the queue depths and the entries kept and
archived (retention). Redis being down does
not make the service unready: billing continues from the WAL (SPEC §7).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Final

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from tollway.api.context import Admin, AppContext, Reader, context, require_worker
from tollway.api.errors import errors_doc
from tollway.api.schemas import BreakerDetailOut, GuardOut, HealthOut, PoisonPageOut, PricesOut, ReadyOut, ReplayOut
from tollway.api.wire import json_response, prices_body
from tollway.redis.errors import UNAVAILABLE
from tollway.redis.projector import ProjectorStatus

POISON_PAGE_LIMIT_DEFAULT: Final = 100
POISON_PAGE_LIMIT_MAX: Final = 1000
QUEUE_DEPTH_TIMEOUT_S: Final = 0.5
STREAM_ID_PATTERN: Final = "^[0-9]{1,20}-[0-9]{1,20}$"

router = APIRouter()


# -- settlement ------------------------------------------------------------------------------


@router.get(
    "/v1/settlement/poison",
    tags=["settlement"],
    response_model=PoisonPageOut,
    summary="Dead letters of the finalize queue — admin",
    responses=errors_doc("redis_unavailable"),
)
async def list_poison(
    _: Admin,
    request: Request,
    after: Annotated[
        str | None, Query(pattern=STREAM_ID_PATTERN, description="next_after of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=POISON_PAGE_LIMIT_MAX)] = POISON_PAGE_LIMIT_DEFAULT,
) -> Response:
    """One page of the poison stream, oldest first (every FINALIZE_FAILED entry has one)."""
    page = await context(request).service.queue.dead_letters(after or "-", limit)
    items = [
        {"message_id": letter.message_id, "billing_entry_id": letter.billing_entry_id, "fields": letter.fields}
        for letter in page
    ]
    next_after = page[-1].message_id if len(page) == limit else None
    return json_response({"items": items, "next_after": next_after})


@router.post(
    "/v1/settlement/poison/replay",
    tags=["settlement"],
    response_model=ReplayOut,
    summary="Replay every dead letter against settlement — admin",
    responses=errors_doc("settlement_not_configured", "redis_unavailable"),
)
async def replay_poison(_: Admin, request: Request) -> Response:
    """Every dead letter (all pages), a few at a time; each success is written as a finalize ack."""
    ctx = context(request)
    report = await require_worker(ctx).replay_dead_letters(ctx.service.settings.replay_concurrency)
    return json_response(dataclasses.asdict(report))


def _breaker(ctx: AppContext) -> dict[str, object]:
    return require_worker(ctx).breaker_view()


@router.get(
    "/v1/settlement/breaker",
    tags=["settlement"],
    response_model=BreakerDetailOut,
    summary="The settlement circuit breaker — admin",
    responses=errors_doc("settlement_not_configured"),
)
async def get_breaker(_: Admin, request: Request) -> Response:
    """CLOSED, OPEN or HALF_OPEN, the failures counted, and when the next probe may go out."""
    return json_response(_breaker(context(request)))


@router.post(
    "/v1/settlement/breaker/reset",
    tags=["settlement"],
    response_model=BreakerDetailOut,
    summary="Close the breaker and forget its failures — admin",
    responses=errors_doc("settlement_not_configured"),
)
async def reset_breaker(_: Admin, request: Request) -> Response:
    """Admin reset of the breaker."""
    ctx = context(request)
    require_worker(ctx).reset_breaker()
    return json_response(_breaker(ctx))


# -- guard -----------------------------------------------------------------------------------


@router.get(
    "/v1/guard",
    tags=["guard"],
    response_model=GuardOut,
    summary="The conservation guard — admin",
    responses=errors_doc(),
)
async def get_guard(_: Admin, request: Request) -> Response:
    """State, whether holds are allowed, and the last results of every check."""
    return json_response(context(request).guard.status().to_dict())


@router.post(
    "/v1/guard/reset",
    tags=["guard"],
    response_model=GuardOut,
    summary="Reset the guard and run its checks again — admin",
    responses=errors_doc(),
)
async def reset_guard(principal: Admin, request: Request) -> Response:
    """Audited in the WAL with the token's subject; the guard is ready again only if the checks pass."""
    guard = context(request).guard
    await guard.reset(principal.subject)
    return json_response(guard.status().to_dict())


# -- prices and health -----------------------------------------------------------------------


@router.get("/v1/prices", tags=["prices"], response_model=PricesOut, summary="The price table", responses=errors_doc())
async def get_prices(_: Reader, request: Request) -> Response:
    """micro-USD per 1,000,000 tokens, input and output, per model."""
    return json_response(prices_body(context(request).pricing))


@router.get("/healthz", tags=["health"], response_model=HealthOut, summary="Liveness")
async def healthz() -> Response:
    """200 while the process serves requests."""
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    tags=["health"],
    response_model=ReadyOut,
    summary="Readiness",
    responses={503: {"model": ReadyOut, "description": "not ready: new holds are refused"}},
)
async def readyz(request: Request) -> Response:
    """Ready while new holds are allowed; the body says why or why not."""
    ctx = context(request)
    engine, worker = ctx.engine, ctx.service.worker
    breaker = worker.breaker_state() if worker is not None else None
    projection = ctx.service.projector.status()
    body = {
        "ready": engine.policy.holds_allowed,
        "guard": ctx.guard.status().to_dict(),
        "breaker": None if breaker is None else {"state": breaker.name, "value": breaker.value},
        "wal": {"last_sequence": engine.state.last_sequence, "durable_sequence": engine.durable_sequence},
        "projection": dataclasses.asdict(projection),
        "redis": _redis(ctx, projection),
        "queues": await _depths(ctx),
        "entries": {
            "kept": len(engine.state.entries) + len(engine.state.settled),
            "archived": engine.state.archived_entries,
            "retention_hours": engine.settings.entry_retention_hours,
        },
    }
    return json_response(body, 200 if body["ready"] else 503, {"Retry-After": "30"} if not body["ready"] else None)


def _redis(ctx: AppContext, projection: ProjectorStatus) -> dict[str, object]:
    """Whether Redis is there: reachable by the projector, and for the embedded one whether it runs."""
    watch = ctx.service.redis_watch
    embedded = None
    if watch is not None:
        embedded = {
            "running": watch.up,
            "pid": watch.server.pid,
            "restarts": watch.restarts,
            "down_since_ms": watch.down_since_ms,
            "last_exit": watch.last_exit,
        }
    return {"connected": projection.connected, "error": projection.redis_error, "embedded": embedded}


async def _depths(ctx: AppContext) -> dict[str, int] | None:
    try:
        return await asyncio.wait_for(ctx.service.queue.depths(), QUEUE_DEPTH_TIMEOUT_S)
    except (*UNAVAILABLE, TimeoutError):
        return None


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "the Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Every metric of SPEC §12, refreshed from the running parts before rendering."""
    ctx = context(request)
    service = ctx.service
    await ctx.metrics.collect_from(
        engine=service.engine,
        worker=service.worker,
        projector=service.projector,
        queue=service.queue,
        guard=ctx.guard.guard,
        redis_watch=service.redis_watch,
    )
    data, content_type = ctx.metrics.render_for(request.headers.get("accept", ""))
    return Response(data, media_type=content_type)
