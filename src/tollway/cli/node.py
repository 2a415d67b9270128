"""``tollway serve --postgres-url``: run a cluster node (the composition root's cluster half).

In one event loop: a pool on the cluster's database, the cluster's identity checked
(:func:`~tollway.pg.schema.open_cluster` refuses another format), a
:class:`~tollway.cluster.node.Node` ticking (heartbeat, leases, one engine per held shard) and
uvicorn serving :func:`~tollway.api.node_app.create_node_app` on a socket bound by the caller.
With ``--redis-url`` (the settings' ``redis_url``), the node's shards have their Redis
projection and, with ``--settlement-url``, their finalize workers
(:mod:`tollway.cluster.shard_redis`); a URL naming a node of a Redis Cluster (``cluster_enabled``
in its ``INFO``) gets redis-py's cluster client. Settlement needs Redis (the finalize queue).
Each shard's conservation guard (:mod:`tollway.cluster.shard_guard`) runs on its owner;
``TOLLWAY_GUARD_BYPASS=true`` (read by ``tollway serve``, in ``options.guard_bypass``) bypasses
the guard of every shard this node starts, each bypass audited in that shard's log.

On SIGTERM or SIGINT the server stops accepting and lets in-flight requests finish, then the
node hands every shard off (no new commands, the batch finished, a snapshot row written, the
lease released, so the other nodes take them at once) and leaves the registry. Nothing here
decides anything about money.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import uvicorn
from redis.asyncio.cluster import RedisCluster

from tollway.api.forwarding import AiohttpForwarder
from tollway.api.node_app import create_node_app
from tollway.cli.server import ServeOptions, _Control, _Server, _uvicorn_config, stop_on_signals
from tollway.cluster.node import Node
from tollway.cluster.shard_redis import RedisSide
from tollway.config import Settings
from tollway.core.errors import ConfigError, LogUnavailable
from tollway.core.lease import LeaseTiming
from tollway.net import bind, url_of
from tollway.pg.errors import PG_ERRORS
from tollway.pg.pool import open_pool
from tollway.pg.schema import ClusterInfo, open_cluster
from tollway.redis.errors import UNAVAILABLE, at_boundary
from tollway.service import settlement_client

log = logging.getLogger("tollway.cluster")

POOL_CONNECTIONS_MAX = 16
CONNECT_TIMEOUT_S = 10
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_DETECT_ATTEMPTS = 5
REDIS_DETECT_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """What makes a ``serve`` a cluster node."""

    postgres_url: str
    node_id: str | None = None
    advertise_url: str | None = None
    lease_ttl_ms: int = 5_000
    shared_port: bool = False  # the socket is shared (SO_REUSEPORT): advertise a private one for forwarding


def lease_timing(ttl_ms: int) -> LeaseTiming:
    """Renew every fifth of the lease, stop serving a tenth before its end."""
    return LeaseTiming(ttl_ms=ttl_ms, renew_every_ms=max(1, ttl_ms // 5), margin_ms=max(1, ttl_ms // 10))


async def serve_node(
    settings: Settings,
    sock: socket.socket,
    options: ServeOptions,
    node_options: NodeOptions,
    on_ready: Callable[[str], None],
) -> int:
    """Run a node until a stop signal (exit code 0); hand every shard off on the way out.

    On a shared port (``--processes``), a connection to it may reach any process of the
    machine, so a request forwarded there could land on a node that does not own its shard: the
    node also listens on a private port of the same address and advertises that one.
    """
    url = url_of(sock)
    if settings.settlement_url is not None and settings.redis_url is None:
        raise ConfigError("cluster mode: --settlement-url needs --redis-url (the finalize queues live in Redis)")
    node_id = node_options.node_id or f"node-{uuid.uuid4().hex[:8]}"
    sockets = [sock]
    if node_options.shared_port:
        sockets.append(bind(sock.getsockname()[0], 0))
    pool = await _pool(node_options.postgres_url, node_id)
    side: RedisSide | None = None
    try:
        async with pool.acquire() as connection:
            info = await open_cluster(connection)
        side = await redis_side(settings, info, node_id)
        node = Node(
            pool,
            info,
            settings,
            node_id=node_id,
            advertise_url=node_options.advertise_url or url_of(sockets[-1]),
            timing=lease_timing(node_options.lease_ttl_ms),
            redis_side=side,
            guard_bypass=options.guard_bypass,
        )
        await _run(node, sockets, options, lambda: on_ready(url))
    finally:
        await pool.close()
        for each in sockets[1:]:
            each.close()
        if side is not None:
            await _close_side(side)
    return 0


async def redis_side(settings: Settings, info: ClusterInfo, node_id: str) -> RedisSide | None:
    """The node's Redis client (a cluster client for a Redis Cluster) and settlement client, if configured."""
    if settings.redis_url is None:
        return None
    client = await redis_client(settings.redis_url)
    settlement = None if settings.settlement_url is None else settlement_client(settings)
    return RedisSide(client, info.cluster_id, node_id, settings, settlement)


async def redis_client(url: str) -> aioredis.Redis:
    """A client of ``url``: redis-py's cluster client when that server runs in cluster mode.

    Whether it does is asked with ``INFO cluster``, a few times if Redis does not answer; a Redis
    still away after that is taken for a plain one (the projectors wait for it), and said so.
    """
    plain = aioredis.Redis.from_url(url, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
    for attempt in range(REDIS_DETECT_ATTEMPTS):
        try:
            info = await _cluster_info(plain)
            break
        except UNAVAILABLE as exc:
            if attempt + 1 == REDIS_DETECT_ATTEMPTS:
                log.warning("redis at the --redis-url does not answer (%s); using it as a single Redis", exc)
                return plain
            await asyncio.sleep(REDIS_DETECT_PAUSE_S)
    if not info.get("cluster_enabled"):
        return plain
    await plain.aclose()
    cluster: aioredis.Redis = RedisCluster.from_url(url, socket_timeout=REDIS_SOCKET_TIMEOUT_S)  # type: ignore[assignment]
    return cluster


@at_boundary
async def _cluster_info(client: aioredis.Redis) -> dict[str, Any]:
    """``INFO cluster``, through the Redis boundary (RedisDown, RedisRefused)."""
    info: dict[str, Any] = await client.info("cluster")
    return info


async def _close_side(side: RedisSide) -> None:
    if side.settlement is not None:
        await side.settlement.aclose()
    await side.client.aclose()


async def _run(node: Node, sockets: list[socket.socket], options: ServeOptions, ready: Callable[[], None]) -> None:
    """Serve until a signal; then hand every shard off while still answering (``shard_moved``), then stop."""
    control = _Control()
    stop = asyncio.Event()
    ticking = asyncio.create_task(node.run(stop))
    leaving: list[asyncio.Task[None]] = []

    async def leave() -> None:
        stop.set()
        await ticking
        await node.leave()
        control.stop()

    def on_signal() -> None:
        if leaving:
            control.stop()  # a second signal: stop waiting
        else:
            leaving.append(asyncio.create_task(leave()))

    with stop_on_signals(on_signal):
        async with AiohttpForwarder.open() as forwarder:
            app = create_node_app(
                node, authenticator=options.authenticator, pricing=options.pricing, forwarder=forwarder
            )
            server = control.attach(_Server(_uvicorn_config(app, options)))
            announcer = asyncio.create_task(_announce(server, ready))
            try:
                await server.serve(sockets=sockets)
            finally:
                announcer.cancel()
                if not leaving:
                    leaving.append(asyncio.create_task(leave()))
                await leaving[0]


async def _announce(server: uvicorn.Server, ready: Callable[[], None]) -> None:
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    ready()


async def _pool(url: str, node_id: str) -> asyncpg.Pool:
    """The node's connections, named ``tollway <node id>`` in ``pg_stat_activity``."""
    try:
        return await open_pool(url, max_size=POOL_CONNECTIONS_MAX, timeout_s=CONNECT_TIMEOUT_S, name=node_id)
    except (*PG_ERRORS, ValueError, OSError) as exc:
        raise LogUnavailable(f"could not connect to PostgreSQL: {exc}") from exc
