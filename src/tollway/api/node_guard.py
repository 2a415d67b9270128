"""The conservation guard on a cluster node: every shard's guard, read and reset through any node.

Each shard's guard runs on the shard's owner (:mod:`tollway.cluster.shard_guard`), so both
operations **fan out** (:mod:`tollway.api.node_fanout`): the node answers for the shards it
serves and asks every other live node for theirs.

- ``GET /v1/guard`` (admin): each shard's guard as the single-node ``GET /v1/guard`` shows it
  (state, whether holds are allowed, recovery stopped, the last results of every check), under
  ``shards``; ``state`` is the worst among them (degraded, then uninitialized, then bypassed,
  then ready) and ``holds_allowed`` whether every one allows new holds.
- ``POST /v1/guard/reset`` (admin): each shard's guard reset by its owner — audited in that
  shard's log with the token's subject — and its checks run again; the answer is the guards
  after the reset. A guard is ready again only if its checks pass.

``?shard=N`` limits either to one shard. Shards that no node answered for are listed in
``unserved_shards`` (moving between nodes, or their owner did not answer: see
``unreachable_nodes``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Annotated, Final

from fastapi import Query, Request
from starlette.responses import Response

from tollway.api.auth import Principal, Scope
from tollway.api.node_fanout import Parts, fan_out
from tollway.api.wire import json_response
from tollway.core.errors import InvalidInput, TollwayError
from tollway.core.guard import GuardState
from tollway.guard import GuardRunner

if TYPE_CHECKING:
    from tollway.api.node_app import NodeContext

log = logging.getLogger("tollway.api")

_STATE_RANK: Final = {
    GuardState.READY.value: 0,
    GuardState.BYPASSED.value: 1,
    GuardState.UNINITIALIZED.value: 2,
    GuardState.DEGRADED.value: 3,
}
ShardQuery = Annotated[int | None, Query(ge=0, description="Only this shard (default: every shard)")]


def _admin(request: Request) -> tuple[NodeContext, Principal]:
    """The node's context and the caller, once authenticated as an admin."""
    ctx: NodeContext = request.app.state.node
    principal = ctx.authenticator.authenticate_header(request.headers.get("authorization", ""))
    principal.require(Scope.ADMIN, None)
    return ctx, principal


def _guards(ctx: NodeContext, shard: int | None) -> dict[int, GuardRunner]:
    """The guards of the shards this node serves (only ``shard``'s if given)."""
    if shard is not None and shard >= ctx.node.info.shards:
        raise InvalidInput(f"shard must be below {ctx.node.info.shards}", field="shard")
    return {n: guard.runner for n, guard in ctx.node.local_guards().items() if shard is None or n == shard}


def _asked(ctx: NodeContext, shard: int | None) -> list[int]:
    return list(range(ctx.node.info.shards)) if shard is None else [shard]


def summary(parts: Parts) -> dict[str, object]:
    """The worst state among the shards' guards and whether every one allows new holds."""
    states = [str(part.get("state")) for part in parts.values()]
    return {
        "state": max(states, key=lambda state: _STATE_RANK.get(state, 3), default=GuardState.READY.value),
        "holds_allowed": all(part.get("holds_allowed") is True for part in parts.values()),
    }


async def get_guard(request: Request, shard: ShardQuery = None) -> Response:
    """GET /v1/guard (admin): every shard's conservation guard, from its owner."""
    ctx, _ = _admin(request)
    local: Parts = {str(n): guard.status().to_dict() for n, guard in _guards(ctx, shard).items()}
    parts, about = await fan_out(request, ctx, local, _asked(ctx, shard))
    return json_response({**summary(parts), "shards": parts, **about})


async def reset_guard(request: Request, shard: ShardQuery = None) -> Response:
    """POST /v1/guard/reset (admin): reset every shard's guard on its owner (audited) and run its checks."""
    ctx, principal = _admin(request)
    guards = _guards(ctx, shard)
    outcomes = await asyncio.gather(*(g.reset(principal.subject) for g in guards.values()), return_exceptions=True)
    local: Parts = {}
    for (number, guard), outcome in zip(guards.items(), outcomes, strict=True):
        if isinstance(outcome, TollwayError):  # the shard stopped here meanwhile: its next owner starts afresh
            log.warning("guard reset of shard %d not done: %s", number, outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            local[str(number)] = guard.status().to_dict()
    parts, about = await fan_out(request, ctx, local, _asked(ctx, shard))
    return json_response({**summary(parts), "shards": parts, **about})


ROUTES: Final = (
    ("GET", "/v1/guard", get_guard, 200),
    ("POST", "/v1/guard/reset", reset_guard, 200),
)
