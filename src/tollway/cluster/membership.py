"""A node's membership in a cluster: heartbeats, which shards it should own, and their leases.

Each :meth:`Membership.tick` (every ``renew_every_ms / 2``):

1. **Self-fence, locally first.** Every held lease whose :func:`~tollway.core.lease.lease_action`
   is ``STOP`` by this node's monotonic clock is dropped and its handler told
   (:meth:`ShardHandler.lost`) — before any statement, so it happens even when PostgreSQL
   does not answer.
2. **Renew** the leases that are due, then **heartbeat** in the registry; a renewal that
   fails (the epoch moved, or it expired by PostgreSQL's clock) drops the shard the same way.
3. **Assign**: :func:`~tollway.core.assignment.assign` over the live nodes (heartbeat younger
   than the lease ttl, by PostgreSQL's clock; this node always counts itself).
4. **Hand off** held shards that now belong elsewhere: :meth:`ShardHandler.hand_off` (stop
   taking commands, finish the batch, snapshot), then release the lease so the next owner
   starts at once.
5. **Acquire** wanted shards whose lease is free or expired (a new epoch), and
   :meth:`ShardHandler.start` each (recover it from the log); the shard is served only once
   ``start`` returns.

:meth:`serving` is what a request asks: the epoch to write with, or None when this node must
not answer for the shard (it holds no lease, or its own clock says the lease may be gone).
:meth:`leave` hands every shard off and deregisters (graceful shutdown).

What it does not know: engines, requests, forwarding. The handler is the seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import asyncpg

from tollway.core.assignment import assign
from tollway.core.errors import LogUnavailable, TollwayError
from tollway.core.lease import LeaseAction, LeaseTiming, lease_action
from tollway.pg import leases
from tollway.pg.leases import Lease

log = logging.getLogger("tollway.cluster")


class ShardHandler(Protocol):
    """What a node does when it gains, gives up or loses a shard (the engines, in the service)."""

    async def start(self, lease: Lease) -> None:
        """Recover the shard from the log; the node serves it once this returns."""

    async def hand_off(self, shard: int) -> None:
        """Graceful: stop taking commands for the shard, finish its batch, write a snapshot."""

    def lost(self, shard: int) -> None:
        """The lease may be gone: stop serving the shard at once (fail its waiting callers as retryable)."""


def monotonic_ms() -> int:
    """The monotonic clock of this process, in milliseconds."""
    return time.monotonic_ns() // 1_000_000


class Membership:
    """One node's view of the cluster and the leases it holds; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        node_id: str,
        advertise_url: str,
        shards: int,
        timing: LeaseTiming,
        handler: ShardHandler,
        clock_ms: Callable[[], int] = monotonic_ms,
    ) -> None:
        self.pool = pool
        self.node_id = node_id
        self.advertise_url = advertise_url
        self.shards = shards
        self.timing = timing
        self.handler = handler
        self.clock_ms = clock_ms
        self.held: dict[int, Lease] = {}
        self._releases: set[asyncio.Task[None]] = set()

    def serving(self, shard: int) -> int | None:
        """The epoch to write ``shard`` with, or None if this node must not answer for it now."""
        lease = self.held.get(shard)
        if lease is None or lease_action(self.timing, lease.sent_mono_ms, self.clock_ms()) is LeaseAction.STOP:
            return None
        return lease.epoch

    async def tick(self) -> None:
        """One round: self-fence, heartbeat, renew, assign, hand off, acquire (see the module docstring)."""
        self._fence_expired()
        try:
            await self._renew_due()  # first: a failed heartbeat must not cost the leases a renewal
            await leases.heartbeat(self.pool, self.node_id, self.advertise_url)
            live = await leases.live_nodes(self.pool, self.timing.ttl_ms)
            owners = assign(self.shards, {node.node_id for node in live} | {self.node_id})
            wanted = {shard for shard, owner in owners.items() if owner == self.node_id}
            for shard in sorted(self.held.keys() - wanted):
                await self._hand_off(shard)
            for shard in sorted(wanted - self.held.keys()):
                await self._acquire(shard)
        except LogUnavailable as exc:
            log.warning("cluster tick of %s failed: %s", self.node_id, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``renew_every_ms / 2`` until ``stop`` is set."""
        while not stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.timing.renew_every_ms / 2000)

    async def leave(self) -> None:
        """Hand off and release every shard, then leave the registry (graceful shutdown)."""
        for shard in sorted(self.held):
            await self._hand_off(shard)
        await leases.deregister(self.pool, self.node_id)

    def forfeit(self, shard: int, why: str) -> None:
        """Stop serving ``shard`` now (its engine stopped): drop it, tell the handler, release its lease.

        A no-op if not held. The release (in the background; if PostgreSQL does not answer, the
        lease expires instead) lets the shard be acquired again at once, with a new epoch, and
        recovered from the log, which says how a batch whose commit was cut short ended. It is
        safe whatever that batch does: the release takes the lease row's lock after it, and a
        batch of the released epoch that comes later is refused by the fence.
        """
        lease = self.held.get(shard)
        if lease is None:
            return
        self._drop(shard, why)
        task = asyncio.get_running_loop().create_task(self._release(lease))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, lease: Lease) -> None:
        try:
            await leases.release(self.pool, lease)
        except LogUnavailable as exc:
            log.warning("node %s could not release shard %d (it will expire): %s", self.node_id, lease.shard, exc)

    def _fence_expired(self) -> None:
        now_ms = self.clock_ms()
        for shard, lease in sorted(self.held.items()):
            if lease_action(self.timing, lease.sent_mono_ms, now_ms) is LeaseAction.STOP:
                self._drop(shard, "its lease may have expired")

    async def _renew_due(self) -> None:
        for shard, lease in sorted(self.held.items()):
            sent_ms = self.clock_ms()
            if lease_action(self.timing, lease.sent_mono_ms, sent_ms) is not LeaseAction.RENEW:
                continue
            renewed = await leases.renew(self.pool, lease, self.timing.ttl_ms, sent_ms)
            if renewed is None:
                self._drop(shard, "its lease was lost")
            else:
                self.held[shard] = renewed

    async def _hand_off(self, shard: int) -> None:
        lease = self.held[shard]
        await self.handler.hand_off(shard)
        del self.held[shard]
        await leases.release(self.pool, lease)

    async def _acquire(self, shard: int) -> None:
        lease = await leases.acquire(self.pool, shard, self.node_id, self.timing.ttl_ms, self.clock_ms())
        if lease is None:
            return
        try:
            await self.handler.start(lease)
        except TollwayError:  # the shard could not be recovered here: let another node try
            log.exception("node %s could not start shard %d", self.node_id, shard)
            await leases.release(self.pool, lease)
            return
        self.held[shard] = lease
        self._fence_expired()  # a slow recovery may have outlived the lease already

    def _drop(self, shard: int, why: str) -> None:
        del self.held[shard]
        log.warning("node %s stops serving shard %d: %s", self.node_id, shard, why)
        self.handler.lost(shard)
