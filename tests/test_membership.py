"""Membership (CLUSTER.md §3-4): nodes share the shards evenly, hand them off, and never serve one at once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import pytest

from tollway.cluster.membership import Membership, monotonic_ms
from tollway.core.assignment import assign
from tollway.core.errors import LogCorrupt
from tollway.core.lease import LeaseTiming
from tollway.pg import leases
from tollway.pg.leases import Lease
from tollway.pg.schema import init_cluster

SHARDS = 8
TIMING = LeaseTiming(ttl_ms=600, renew_every_ms=150, margin_ms=100)


@dataclass
class Recorder:
    """A ShardHandler that records what it was told, with the monotonic time."""

    node_id: str
    calls: list[tuple[str, int, int]] = field(default_factory=list)  # (what, shard, mono_ms)

    async def start(self, lease: Lease) -> None:
        self.calls.append(("start", lease.shard, monotonic_ms()))

    async def hand_off(self, shard: int) -> None:
        self.calls.append(("hand_off", shard, monotonic_ms()))

    def lost(self, shard: int) -> None:
        self.calls.append(("lost", shard, monotonic_ms()))

    def shards(self, what: str) -> list[int]:
        return sorted(shard for kind, shard, _ in self.calls if kind == what)


def node(pool: asyncpg.Pool, node_id: str) -> tuple[Membership, Recorder]:
    recorder = Recorder(node_id)
    membership = Membership(
        pool, node_id=node_id, advertise_url=f"http://{node_id}", shards=SHARDS, timing=TIMING, handler=recorder
    )
    return membership, recorder


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling state owned by other tasks
            await asyncio.sleep(0.01)


@pytest.fixture
async def cluster(pg_pool: asyncpg.Pool) -> asyncpg.Pool:
    """An eight-shard cluster on a fresh database."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
    return pg_pool


async def test_two_nodes_converge_on_the_assignment(cluster: asyncpg.Pool) -> None:
    """A first node takes every shard; when a second joins, the first hands over exactly the second's share."""
    a, a_calls = node(cluster, "node-a")
    b, b_calls = node(cluster, "node-b")
    await a.tick()
    assert list(range(SHARDS)) == sorted(a.held)
    for _ in range(3):
        await b.tick()
        await a.tick()
    await b.tick()
    wanted = assign(SHARDS, ["node-a", "node-b"])
    assert {s for s, n in wanted.items() if n == "node-a"} == set(a.held)
    assert {s for s, n in wanted.items() if n == "node-b"} == set(b.held)
    assert (list(range(SHARDS)), sorted(b.held), sorted(b.held)) == (
        a_calls.shards("start"),
        a_calls.shards("hand_off"),
        b_calls.shards("start"),
    )
    assert all(a.serving(s) is not None for s in a.held)
    assert all(a.serving(s) is None for s in b.held)


async def test_a_paused_node_stops_serving_before_another_takes_over(cluster: asyncpg.Pool) -> None:
    """A node that stops ticking self-fences by its own clock before the other node starts its shards."""
    a, _ = node(cluster, "node-a")
    b, b_calls = node(cluster, "node-b")
    await a.tick()
    taken_from_a = dict(a.held)
    deadline_s = asyncio.get_running_loop().time() + 10
    while len(b.held) < SHARDS:  # a is paused: it never ticks again
        assert asyncio.get_running_loop().time() < deadline_s
        await b.tick()
        await asyncio.sleep(TIMING.renew_every_ms / 2000)
    for kind, shard, at_ms in b_calls.calls:
        assert "start" == kind
        old = taken_from_a[shard]
        assert at_ms >= TIMING.serve_until_ms(old.sent_mono_ms)  # a had stopped answering by then
        a.clock_ms = itertools.repeat(at_ms).__next__  # a's clock when b started the shard
        assert a.serving(shard) is None
        assert old.epoch + 1 == b.held[shard].epoch


async def test_a_graceful_leave_lets_the_other_node_start_at_once(cluster: asyncpg.Pool) -> None:
    """After leave() (hand off, release, deregister) the other node takes every shard on its next tick."""
    a, a_calls = node(cluster, "node-a")
    b, _ = node(cluster, "node-b")
    await a.tick()
    await b.tick()
    await a.tick()
    await a.leave()
    assert list(range(SHARDS)) == a_calls.shards("hand_off")
    await b.tick()
    assert list(range(SHARDS)) == sorted(b.held)
    assert ["node-b"] == [n.node_id for n in await leases.live_nodes(cluster, TIMING.ttl_ms)]


async def test_a_lease_taken_away_is_dropped_at_the_next_renewal(cluster: asyncpg.Pool) -> None:
    """If another writer bumped a shard's epoch, the renewal fails and the shard is reported lost."""
    a, a_calls = node(cluster, "node-a")
    await a.tick()
    await cluster.execute("UPDATE tollway.leases SET expires_at = now() - interval '1 second' WHERE shard = 3")
    intruder = await leases.acquire(cluster, 3, "intruder", 60_000, monotonic_ms())
    assert intruder is not None
    a.clock_ms = lambda: monotonic_ms() + TIMING.renew_every_ms  # a renewal is due
    await a.tick()
    assert ([3], None) == (a_calls.shards("lost"), a.serving(3))
    assert 3 not in a.held


async def test_a_shard_that_fails_to_start_is_released(cluster: asyncpg.Pool) -> None:
    """If recovering a shard fails, its lease is released for another node and the shard is not served."""

    class Broken(Recorder):
        async def start(self, lease: Lease) -> None:
            if lease.shard == 5:
                raise LogCorrupt("shard 5 sequence 1: checksum mismatch")
            await super().start(lease)

    a = Membership(
        cluster, node_id="node-a", advertise_url="http://a", shards=SHARDS, timing=TIMING, handler=Broken("node-a")
    )
    await a.tick()
    row = (await leases.lease_rows(cluster))[5]
    assert (5 not in a.held, None, 1) == (True, row.owner, row.epoch)
    assert a.serving(5) is None


async def test_no_two_nodes_serve_a_shard_at_once(cluster: asyncpg.Pool) -> None:
    """Two running nodes, one joining late, the other dying without release: never two servers for a shard."""
    a, _ = node(cluster, "node-a")
    b, _ = node(cluster, "node-b")
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    samples: list[dict[int, list[str]]] = []

    async def sample(until: asyncio.Event) -> None:
        while not until.is_set():
            samples.append({s: [m.node_id for m in (a, b) if m.serving(s) is not None] for s in range(SHARDS)})
            await asyncio.sleep(0.002)

    done = asyncio.Event()
    sampler = asyncio.create_task(sample(done))
    running_a = asyncio.create_task(a.run(stop_a))
    await eventually(lambda: len(a.held) == SHARDS)
    running_b = asyncio.create_task(b.run(stop_b))
    await eventually(lambda: len(a.held) == len(b.held) == SHARDS // 2)  # b joined: a handed over b's share
    running_a.cancel()  # a dies: no hand-off, no release
    with contextlib.suppress(asyncio.CancelledError):
        await running_a
    await eventually(lambda: len(b.held) == SHARDS)
    stop_b.set()
    await running_b
    done.set()
    await sampler
    assert all(len(servers) <= 1 for sample in samples for servers in sample.values())
    assert any(sorted(s.values()) != sorted(samples[0].values()) for s in samples)  # ownership did move
    assert all(a.serving(s) is None for s in range(SHARDS))
