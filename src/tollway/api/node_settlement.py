"""Settlement operations on a cluster node: dead letters, bulk replay, the breakers — over the whole cluster.

Every shard has its own finalize queue (under its hash tag) and, on its owner, its own finalize
worker with its own circuit breaker. The admin operations span the cluster:

- ``GET /v1/settlement/poison`` reads the dead-letter streams of every shard **directly from
  Redis** (one Redis or Redis Cluster serves every shard, so any node can): shards in order,
  oldest first within a shard, each item naming its ``shard``; the cursor ``after`` is
  ``<shard>/<message id>`` (the ``next_after`` of the previous page).
- ``POST /v1/settlement/poison/replay``, ``GET /v1/settlement/breaker`` and
  ``POST /v1/settlement/breaker/reset`` need the workers, which run on the shards' owners: the
  node answers for the shards it serves and **fans out** the same request to every other live
  node (:mod:`tollway.api.node_fanout`: marked as forwarded, so it is answered locally there
  and never fanned out again); the answer merges them per shard, lists nodes that did not
  answer, and the shards nobody served.

Without Redis every one answers 409 ``settlement_not_configured`` (the dead-letter list: an empty
page); the worker operations need ``--settlement-url`` too.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Annotated, Final

from fastapi import Query, Request
from starlette.responses import Response

from tollway.api.auth import Scope
from tollway.api.errors import ApiError
from tollway.api.node_fanout import Parts, fan_out
from tollway.api.wire import json_response
from tollway.cluster.shard_redis import RedisSide, ShardRedis
from tollway.finalizer import FinalizeWorker
from tollway.redis.queue import FinalizeQueue

if TYPE_CHECKING:
    from tollway.api.node_app import NodeContext

POISON_PAGE_LIMIT_DEFAULT: Final = 100
POISON_PAGE_LIMIT_MAX: Final = 1000
CURSOR_PATTERN: Final = "^[0-9]{1,4}/[0-9]{1,20}-[0-9]{1,20}$"
_STATE_RANK: Final = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}


def _ctx(request: Request, scope: Scope) -> NodeContext:
    """The node's context, once the caller is authenticated with ``scope``."""
    ctx: NodeContext = request.app.state.node
    ctx.authenticator.authenticate_header(request.headers.get("authorization", "")).require(scope, None)
    return ctx


def _side(ctx: NodeContext) -> RedisSide:
    side = ctx.node.engines.redis_side
    if side is None:
        raise ApiError("settlement_not_configured", "this cluster node runs without Redis (--redis-url)")
    return side


def _workers(ctx: NodeContext) -> dict[int, FinalizeWorker]:
    """The finalize workers of the shards this node serves; 409 without settlement."""
    side = _side(ctx)
    if side.settlement is None:
        raise ApiError(
            "settlement_not_configured", "standalone mode: no settlement service is configured (--settlement-url)"
        )
    served: dict[int, ShardRedis] = ctx.node.local_redis()
    return {number: shard.worker for number, shard in served.items() if shard.worker is not None}


# -- dead letters: read from Redis directly ----------------------------------------------------


async def list_poison(
    request: Request,
    after: Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="next_after of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=POISON_PAGE_LIMIT_MAX)] = POISON_PAGE_LIMIT_DEFAULT,
) -> Response:
    """GET /v1/settlement/poison (admin): one page of every shard's dead letters, shard by shard."""
    ctx = _ctx(request, Scope.ADMIN)
    side = ctx.node.engines.redis_side
    if side is None:
        return json_response({"items": [], "next_after": None})
    shard_from, message_after = 0, "-"
    if after is not None:
        text_shard, _, message_after = after.partition("/")
        shard_from = int(text_shard)
    items: list[dict[str, object]] = []
    for number in range(shard_from, ctx.node.info.shards):
        queue = FinalizeQueue(side.client, side.keys(number), consumer=side.node_id)
        page = await queue.dead_letters(message_after if number == shard_from else "-", limit - len(items))
        items += [
            {
                "shard": number,
                "message_id": letter.message_id,
                "billing_entry_id": letter.billing_entry_id,
                "fields": letter.fields,
            }
            for letter in page
        ]
        if len(items) >= limit:
            last = items[-1]
            return json_response({"items": items, "next_after": f"{last['shard']}/{last['message_id']}"})
    return json_response({"items": items, "next_after": None})


# -- worker operations: fanned out to the owners -------------------------------------------------


async def replay_poison(request: Request) -> Response:
    """POST /v1/settlement/poison/replay (admin): every dead letter of every shard, by its owner."""
    ctx = _ctx(request, Scope.ADMIN)
    workers = _workers(ctx)
    concurrency = _side(ctx).settings.replay_concurrency
    reports = await asyncio.gather(*(worker.replay_dead_letters(concurrency) for worker in workers.values()))
    local: Parts = {str(n): dataclasses.asdict(report) for n, report in zip(workers, reports, strict=True)}
    shards, about = await fan_out(request, ctx, local)
    totals = dict.fromkeys(("examined", "acked", "still_failing", "skipped", "refused"), 0)
    for report in shards.values():
        for name in totals:
            count = report.get(name, 0)
            totals[name] += count if isinstance(count, int) else 0
    return json_response({**totals, "shards": shards, **about})


async def get_breaker(request: Request) -> Response:
    """GET /v1/settlement/breaker (admin): every shard's breaker, and the worst state among them."""
    ctx = _ctx(request, Scope.ADMIN)
    local: Parts = {str(n): worker.breaker_view() for n, worker in _workers(ctx).items()}
    return json_response(_with_worst(*await fan_out(request, ctx, local)))


async def reset_breaker(request: Request) -> Response:
    """POST /v1/settlement/breaker/reset (admin): close every shard's breaker and forget its failures."""
    ctx = _ctx(request, Scope.ADMIN)
    workers = _workers(ctx)
    for worker in workers.values():
        worker.reset_breaker()
    local: Parts = {str(n): worker.breaker_view() for n, worker in workers.items()}
    return json_response(_with_worst(*await fan_out(request, ctx, local)))


def _with_worst(shards: Parts, about: dict[str, object]) -> dict[str, object]:
    states = [str(view.get("state", "CLOSED")) for view in shards.values()]
    worst = max(states, key=lambda state: _STATE_RANK.get(state, 0), default="CLOSED")
    return {"state": worst, "shards": shards, **about}


ROUTES: Final = (
    ("GET", "/v1/settlement/poison", list_poison, 200),
    ("POST", "/v1/settlement/poison/replay", replay_poison, 200),
    ("GET", "/v1/settlement/breaker", get_breaker, 200),
    ("POST", "/v1/settlement/breaker/reset", reset_breaker, 200),
)
