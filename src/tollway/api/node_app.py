"""The HTTP API of a cluster node: every request answered by its shard's engine, here or one hop away.

A request names its shard through its account (``account_id`` in the body of a reservation or
a charge, or in the path) or its billing entry id (characters 10-11). The node asks
:meth:`tollway.cluster.node.Node.route`:

- **local**: the node holds the shard's lease and its own clock says it may answer: the same
  translation, commands and wire bodies as the single-node API (``translate``, ``wire``, the
  one error table);
- **forward**: another live node holds it: the request (method, path, query, body,
  ``Authorization``) goes to the owner's advertised URL through the node's
  :class:`~tollway.api.forwarding.Forwarder`, at most one hop (a forwarded request is never
  forwarded again), within the caller's deadline (``X-Tollway-Deadline-Ms``, epoch
  milliseconds, passed on; :data:`FORWARD_TIMEOUT_MS` when absent), and the owner's status
  and body are answered as they are;
- **nobody now** (the shard is moving, its batch was fenced, the owner cannot be reached):
  503 ``shard_moved`` with a short ``Retry-After``; commands are idempotent, so the retry takes
  effect once wherever the shard is then.

The caller is authenticated and its body validated before a request is forwarded, so a
non-owner refuses exactly what the owner would.

Answered by every node itself, never forwarded: ``GET /v1/cluster``; ``GET /metrics`` (the
shards this node serves, labelled by shard: :mod:`tollway.cluster.metrics`); ``GET /v1/prices``
(this node's price table, which is configuration, not cluster state: every node should be
given the same one, and ``/v1/cluster`` shows its ``prices_sha256`` to compare); ``/docs`` and
``/openapi.json`` (Swagger UI from an installed package, as the single-node service).
Settlement operations (dead letters, replay, breakers) span the cluster
(:mod:`tollway.api.node_settlement`), and so does the conservation guard of every shard
(``GET /v1/guard``, ``POST /v1/guard/reset``: :mod:`tollway.api.node_guard`). ``/readyz`` is
200 while the node serves its share and the guard of every shard it serves allows new holds,
503 otherwise; its body shows each served shard's guard.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import FastAPI, Path, Query, Request
from starlette.responses import Response

from tollway.api import docs
from tollway.api.app import API_DESCRIPTION, API_TITLE, API_VERSION
from tollway.api.auth import Authenticator, Principal, Scope
from tollway.api.errors import ApiError, install_error_handlers, refusal_response
from tollway.api.forwarding import Forwarder, ForwardFailed
from tollway.api.node_guard import ROUTES as GUARD_ROUTES
from tollway.api.node_guard import summary as guard_summary
from tollway.api.node_settlement import ROUTES as SETTLEMENT_ROUTES
from tollway.api.routes_accounts import history_page
from tollway.api.routes_billing import entry_outcome
from tollway.api.schemas import (
    ChargeRequest,
    CommitRequest,
    CreditRequest,
    EntryStateName,
    ExtendRequest,
    ReleaseRequest,
    ReserveRequest,
    VoidRequest,
)
from tollway.api.translate import charge_command, commit_command, credit_command, reserve_command
from tollway.api.wire import balance_body, credit_body, entry_body, json_response, prices_body
from tollway.cluster.metrics import NodeMetrics
from tollway.cluster.node import Node
from tollway.core import commands as cmd
from tollway.core.decide import GONE
from tollway.core.errors import ClusterError, EngineStopped
from tollway.core.ids import check_account_id, check_entry_id
from tollway.core.lifecycle import EntryState
from tollway.core.pricing import PriceTable
from tollway.core.state import Entry
from tollway.engine import Engine
from tollway.guard import RETRY_AFTER_SECONDS

FORWARDED_HEADER: Final = "x-tollway-forwarded-by"
DEADLINE_HEADER: Final = "x-tollway-deadline-ms"
FORWARD_TIMEOUT_MS: Final = 10_000
"""A forwarded request's deadline when the caller gave none."""
ANSWERED_BY_HEADER: Final = "x-tollway-answered-by"
"""On an answer of a shard's engine: ``<node id> <shard> <epoch>`` (forwarded answers keep it)."""
_PASSED_RESPONSE_HEADERS: Final = ("content-type", "retry-after", "www-authenticate", ANSWERED_BY_HEADER)

EntryId = Annotated[str, Path()]
AccountId = Annotated[str, Path()]
Local = Callable[[Engine], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class NodeContext:
    """What the node's handlers reach."""

    node: Node
    authenticator: Authenticator
    pricing: PriceTable
    forwarder: Forwarder
    metrics: NodeMetrics
    prices_sha256: str  # of this node's GET /v1/prices body: equal on every node given the same table


def _ctx(request: Request) -> NodeContext:
    found: NodeContext = request.app.state.node
    return found


def _principal(request: Request, scope: Scope, account_id: str | None = None) -> Principal:
    principal = _ctx(request).authenticator.authenticate_header(request.headers.get("authorization", ""))
    principal.require(scope, account_id)
    return principal


def shard_moved(number: int, why: str) -> ApiError:
    """The retryable refusal of a request whose shard has no answering owner right now."""
    return ApiError("shard_moved", f"shard {number} is moving between nodes ({why}); retry shortly", shard=number)


async def _via_shard(request: Request, number: int, local: Local) -> Response:
    """Answer with the shard's local engine, forward to its owner, or refuse as ``shard_moved``."""
    ctx = _ctx(request)
    route = ctx.node.route(number)
    if route.engine is not None:
        try:
            response = await local(route.engine)
        except (ClusterError, EngineStopped) as exc:  # fenced, or PostgreSQL failed the batch: retry
            raise shard_moved(number, "its engine here stopped") from exc
        response.headers[ANSWERED_BY_HEADER] = f"{ctx.node.node_id} {number} {route.epoch}"
        return response
    if route.forward_url is None:
        raise shard_moved(number, "no node serves it yet")
    if FORWARDED_HEADER in request.headers:
        raise shard_moved(number, "forwarded here, but this node does not serve it")
    return await _forward(request, route.forward_url, number)


async def _forward(request: Request, base_url: str, number: int) -> Response:
    """One hop to the owner, within the caller's deadline; its status and body answered as they are."""
    ctx = _ctx(request)
    now_ms = time.time_ns() // 1_000_000
    deadline_ms = _deadline_ms(request, now_ms)
    headers = {FORWARDED_HEADER: ctx.node.node_id, DEADLINE_HEADER: str(deadline_ms)}
    for name in ("authorization", "content-type"):
        if name in request.headers:
            headers[name] = request.headers[name]
    query = request.url.query
    url = base_url.rstrip("/") + request.url.path + (f"?{query}" if query else "")
    try:
        answer = await ctx.forwarder.send(
            request.method,
            url,
            content=await request.body(),
            headers=headers,
            timeout_s=max(0.001, (deadline_ms - now_ms) / 1000),
        )
    except ForwardFailed as exc:
        raise shard_moved(number, f"its owner did not answer: {exc}") from exc
    passed = {name: answer.headers[name] for name in _PASSED_RESPONSE_HEADERS if name in answer.headers}
    return Response(answer.content, status_code=answer.status, headers=passed)


def _deadline_ms(request: Request, now_ms: int) -> int:
    given = request.headers.get(DEADLINE_HEADER, "")
    return int(given) if given.isdigit() else now_ms + FORWARD_TIMEOUT_MS


def _entry_shard(request: Request, billing_entry_id: str) -> int:
    check_entry_id(billing_entry_id)
    return _ctx(request).node.shard_of_entry(billing_entry_id)


def _account_shard(request: Request, account_id: str) -> int:
    check_account_id(account_id)
    return _ctx(request).node.shard_of_account(account_id)


async def _checked_entry(engine: Engine, principal: Principal, scope: Scope, billing_entry_id: str) -> Entry | None:
    """The entry (a settled one read back from the log), once the caller may act on its account."""
    found = await engine.read_entry(billing_entry_id)
    if found is None:
        return None
    principal.require(scope, found[0].account_id)
    return found[0]


# -- billing ---------------------------------------------------------------------------------


async def create_reservation(body: ReserveRequest, request: Request) -> Response:
    """POST /v1/reservations on the account's shard."""
    _principal(request, Scope.GATEWAY, body.account_id)
    pricing = _ctx(request).pricing  # the owner prices: a forwarded hold is priced by the node that serves it
    number = _account_shard(request, body.account_id)
    return await _via_shard(request, number, lambda e: _execute_entry(e, reserve_command(body, pricing)))


async def create_charge(body: ChargeRequest, request: Request) -> Response:
    """POST /v1/charges on the account's shard."""
    _principal(request, Scope.GATEWAY, body.account_id)
    command = charge_command(body)
    return await _via_shard(request, _account_shard(request, body.account_id), lambda e: _execute_entry(e, command))


async def _execute_entry(engine: Engine, command: cmd.Command) -> Response:
    return entry_outcome(await engine.execute(command))


async def get_reservation(billing_entry_id: EntryId, request: Request) -> Response:
    """GET /v1/reservations/{id} from the entry's shard."""
    principal = _principal(request, Scope.READ)

    async def local(engine: Engine) -> Response:
        found = await engine.read_entry(billing_entry_id)  # a settled one from the log
        if found is None:
            raise ApiError("not_found", f"no billing entry {billing_entry_id}{GONE}", billing_entry_id=billing_entry_id)
        principal.require(Scope.READ, found[0].account_id)
        return json_response(entry_body(found[0], response_json=found[1]))

    return await _via_shard(request, _entry_shard(request, billing_entry_id), local)


def _entry_verb(
    scope: Scope, build: Callable[[Entry | None, Principal, str], cmd.Command]
) -> Callable[[str, Request], Awaitable[Response]]:
    async def handler(billing_entry_id: str, request: Request) -> Response:
        principal = _principal(request, scope)

        async def local(engine: Engine) -> Response:
            entry = await _checked_entry(engine, principal, scope, billing_entry_id)
            return entry_outcome(await engine.execute(build(entry, principal, billing_entry_id)))

        return await _via_shard(request, _entry_shard(request, billing_entry_id), local)

    return handler


async def commit_reservation(billing_entry_id: EntryId, body: CommitRequest, request: Request) -> Response:
    """POST /v1/reservations/{id}/commit on the entry's shard."""
    pricing = _ctx(request).pricing
    handler = _entry_verb(Scope.GATEWAY, lambda e, _p, i: commit_command(i, body, e, pricing))
    return await handler(billing_entry_id, request)


async def release_reservation(billing_entry_id: EntryId, body: ReleaseRequest, request: Request) -> Response:
    """POST /v1/reservations/{id}/release on the entry's shard."""
    return await _entry_verb(Scope.GATEWAY, lambda _e, _p, i: cmd.Release(i, body.reason))(billing_entry_id, request)


async def extend_reservation(billing_entry_id: EntryId, body: ExtendRequest, request: Request) -> Response:
    """POST /v1/reservations/{id}/extend on the entry's shard."""
    return await _entry_verb(Scope.GATEWAY, lambda _e, _p, i: cmd.Extend(i, body.ttl_s))(billing_entry_id, request)


async def void_entry(billing_entry_id: EntryId, body: VoidRequest, request: Request) -> Response:
    """POST /v1/entries/{id}/void (admin) on the entry's shard.

    Refused (409 ``settlement_call_in_flight``) while the shard's finalize worker is calling
    settlement for the entry, as on a single node.
    """
    principal = _principal(request, Scope.ADMIN)
    number = _entry_shard(request, billing_entry_id)

    async def local(engine: Engine) -> Response:
        await _checked_entry(engine, principal, Scope.ADMIN, billing_entry_id)
        side = _ctx(request).node.local_redis().get(number)
        if side is not None and side.worker is not None and billing_entry_id in side.worker.in_flight:
            raise ApiError(
                "settlement_call_in_flight",
                "settlement is being called for this entry right now; retry the void once the call ends",
                billing_entry_id=billing_entry_id,
            )
        return entry_outcome(await engine.execute(cmd.Void(billing_entry_id, body.reason, principal.subject)))

    return await _via_shard(request, number, local)


async def finalize_entry(billing_entry_id: EntryId, request: Request) -> Response:
    """POST /v1/entries/{id}/finalize (admin) on the entry's shard."""
    handler = _entry_verb(Scope.ADMIN, lambda _e, _p, i: cmd.FinalizeAck(i, source="admin"))
    return await handler(billing_entry_id, request)


# -- accounts --------------------------------------------------------------------------------


async def get_account(account_id: AccountId, request: Request) -> Response:
    """GET /v1/accounts/{id} from the account's shard."""
    number = _account_shard(request, account_id)
    _principal(request, Scope.READ, account_id)

    async def local(engine: Engine) -> Response:
        account = await engine.read_balance(account_id)
        exists = account_id in engine.state.accounts
        rate = engine.policy.credit_units_per_usd
        return json_response(balance_body(account_id, account, rate, engine.durable_sequence, exists=exists))

    return await _via_shard(request, number, local)


async def list_entries(
    *,
    account_id: AccountId,
    request: Request,
    state: Annotated[list[EntryStateName] | None, Query()] = None,
    cursor: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """GET /v1/accounts/{id}/entries from the account's shard."""
    number = _account_shard(request, account_id)
    _principal(request, Scope.READ, account_id)
    states = frozenset(EntryState(name) for name in state or ())

    async def local(engine: Engine) -> Response:
        return json_response(await history_page(engine, account_id, states, cursor, limit))

    return await _via_shard(request, number, local)


async def create_credit(account_id: AccountId, body: CreditRequest, request: Request) -> Response:
    """POST /v1/accounts/{id}/credits (admin) on the account's shard."""
    number = _account_shard(request, account_id)
    _principal(request, Scope.ADMIN, account_id)
    command = credit_command(account_id, body)

    async def local(engine: Engine) -> Response:
        outcome = await engine.execute(command)
        if isinstance(outcome, cmd.Refusal):
            return refusal_response(outcome)
        assert isinstance(outcome, cmd.CreditResult)
        status = 200 if outcome.replayed else 201
        return json_response(credit_body(outcome, engine.policy.credit_units_per_usd), status)

    return await _via_shard(request, number, local)


# -- the cluster -----------------------------------------------------------------------------


async def get_cluster(request: Request) -> Response:
    """GET /v1/cluster: the shard map (owner, epoch, last sequence), the live nodes, what this node serves."""
    _principal(request, Scope.READ)
    ctx = _ctx(request)
    return json_response({**ctx.node.view(), "prices_sha256": ctx.prices_sha256})


async def get_prices(request: Request) -> Response:
    """GET /v1/prices: this node's price table (the owner of a shard prices its reservations and commits)."""
    _principal(request, Scope.READ)
    return json_response(prices_body(_ctx(request).pricing))


async def metrics(request: Request) -> Response:
    """GET /metrics: the figures of the shards this node serves, labelled by shard (Prometheus)."""
    data, content_type = _ctx(request).metrics.render_for(request.headers.get("accept", ""))
    return Response(data, media_type=content_type)


async def healthz() -> Response:
    """Liveness."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready once this node serves its share and the guards of its shards allow new holds; says what does not run."""
    node = _ctx(request).node
    serving = sorted(node.local_engines())
    guards: dict[str, dict[str, object]] = {
        str(number): {
            "state": status.state.value,
            "holds_allowed": status.holds_allowed,
            "recovery_stopped": status.recovery_stopped,
            "reason": status.reason,
        }
        for number, status in ((n, guard.runner.status()) for n, guard in node.local_guards().items())
    }
    guard = {**guard_summary(guards), "shards": guards}
    body = {
        "ready": (bool(serving) or not node.lease_rows) and guard["holds_allowed"] is True,
        "mode": "cluster",
        "node_id": node.node_id,
        "serving_shards": serving,
        "guard": guard,
        "not_running": _not_running(node),
    }
    if body["ready"]:
        return json_response(body)
    return json_response(body, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)} if guards else None)


def _not_running(node: Node) -> list[str]:
    side = node.engines.redis_side
    missing = [] if side is not None else ["redis_projection"]
    if side is None or side.settlement is None:
        missing.append("finalize_worker")
    return missing


_ROUTES: Final = (
    ("POST", "/v1/reservations", create_reservation, 201),
    ("POST", "/v1/charges", create_charge, 201),
    ("GET", "/v1/reservations/{billing_entry_id}", get_reservation, 200),
    ("POST", "/v1/reservations/{billing_entry_id}/commit", commit_reservation, 200),
    ("POST", "/v1/reservations/{billing_entry_id}/release", release_reservation, 200),
    ("POST", "/v1/reservations/{billing_entry_id}/extend", extend_reservation, 200),
    ("POST", "/v1/entries/{billing_entry_id}/void", void_entry, 200),
    ("POST", "/v1/entries/{billing_entry_id}/finalize", finalize_entry, 200),
    ("GET", "/v1/accounts/{account_id}", get_account, 200),
    ("GET", "/v1/accounts/{account_id}/entries", list_entries, 200),
    ("POST", "/v1/accounts/{account_id}/credits", create_credit, 201),
    ("GET", "/v1/cluster", get_cluster, 200),
    ("GET", "/v1/prices", get_prices, 200),
    ("GET", "/metrics", metrics, 200),
    ("GET", "/healthz", healthz, 200),
    ("GET", "/readyz", readyz, 200),
)


def create_node_app(node: Node, *, authenticator: Authenticator, pricing: PriceTable, forwarder: Forwarder) -> FastAPI:
    """The API of a cluster node over ``node``; ``forwarder`` sends what goes to other nodes."""
    app = FastAPI(
        title=f"{API_TITLE} (cluster node)",
        version=API_VERSION,
        description=API_DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,  # tollway.api.docs serves /docs with local assets
        redoc_url=None,
    )
    digest = hashlib.sha256(json_response(prices_body(pricing)).body).hexdigest()
    app.state.node = NodeContext(node, authenticator, pricing, forwarder, NodeMetrics(node), digest)
    for method, path, handler, status in (*_ROUTES, *SETTLEMENT_ROUTES, *GUARD_ROUTES):
        app.add_api_route(path, handler, methods=[method], status_code=status)
    app.include_router(docs.router)
    install_error_handlers(app)
    return app
