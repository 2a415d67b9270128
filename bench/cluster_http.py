"""Reserve → commit pairs over HTTP through a cluster on this machine: the maximum, and the tail at half of it.

One *arm* is a fresh eight-shard cluster in its own database, served by real node processes
(:mod:`bench.cluster_nodes`): one node, two nodes on two ports, or ``tollway serve --processes
2`` (two nodes on one port, ``SO_REUSEPORT``). Against each arm, from this process:

- **closed loop**: ``--http-concurrency`` keep-alive connections spread over the arm's ports,
  each looping pairs on ``--http-accounts`` funded accounts for ``--http-seconds`` after a
  warm-up; a 503 ``shard_moved`` is retried with the same request and counted, anything else
  unexpected voids the run. ``pairs_per_s`` is the arm's measured maximum.
- **open loop** at :data:`OPEN_LOOP_SHARE` of that maximum (``bench/load.py``'s
  :func:`~bench.load.open_loop`): pairs due on a fixed schedule, each reserve's latency counted
  from when it was *due*. The phase reports how late the generator started pairs whose
  connection was free (``generator_lag_p99_ms``); over
  :data:`~bench.load.GENERATOR_LAG_P99_MS_MAX` the phase measured the generator, not the
  nodes: ``valid`` is false and the arm's ``reserve_p*_ms_at_50pct`` are null.

Every phase reports the CPU busy share (CPU time over wall time, 1.0 = one core) of the
generator (this process), of each node and of PostgreSQL's backends: they all share the
machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.cluster_nodes import Nodes, Spread, Tokens, create_cluster, fund, start_nodes, start_processes
from bench.load import (
    BenchError,
    Connection,
    Target,
    account_name,
    children_cpu_s,
    closed_loop,
    commit_request,
    open_loop,
    process_cpu_s,
    reserve_request,
)

OPEN_LOOP_SHARE: Final = 0.5
RETRY_S: Final = 0.05
ENTRY_ID: Final = re.compile(rb'"billing_entry_id":"([0-9A-Z]{26})"')


@dataclass(frozen=True)
class Arm:
    """What serves one HTTP run: ``count`` nodes on their own ports, or on one shared port (``--processes``)."""

    count: int
    shared_port: bool = False

    @property
    def name(self) -> str:
        """``1 node``, ``2 nodes``, ``2 processes``."""
        if self.shared_port:
            return f"{self.count} processes"
        return f"{self.count} node" + ("s" if self.count > 1 else "")


ARMS: Final = (Arm(1), Arm(2), Arm(2, shared_port=True))


class Retries:
    """Reserve → commit pairs that retry a 503 ``shard_moved`` (the same request), counting the retries."""

    def __init__(self, target: Target, run: str, accounts: int) -> None:
        self.target = target
        self.run = run
        self.accounts = accounts
        self.retried = 0

    async def exchange(self, connection: Connection, request: bytes, expected: int) -> bytes:
        """One request, retried while the answer is a retryable 503; anything else unexpected voids the run."""
        while True:
            status, body = await connection.exchange(request)
            if status == expected:
                return body
            if status != 503 or b"shard_moved" not in body:
                raise BenchError(f"answered {status}: {body[:300]!r}")
            self.retried += 1
            await asyncio.sleep(RETRY_S)

    async def step(self, connection: Connection, worker: int, index: int) -> int:
        """One pair; when the reserve's answer arrived (perf_counter ns) minus when it started."""
        started_ns = time.perf_counter_ns()
        account = account_name((worker * 7919 + index) % self.accounts)
        body = await self.exchange(
            connection, reserve_request(self.target, account, f"{self.run}-{worker}-{index}"), 201
        )
        reserved_ns = time.perf_counter_ns()
        found = ENTRY_ID.search(body)
        if found is None:
            raise BenchError(f"no billing_entry_id in {body[:300]!r}")
        await self.exchange(connection, commit_request(self.target, found.group(1)), 200)
        return reserved_ns - started_ns


class CpuWatch:
    """CPU time of the nodes and of PostgreSQL's backends since it was made, over wall time."""

    def __init__(self, pids: list[int], pg_pid: int) -> None:
        self.pids = pids
        self.pg_pid = pg_pid
        self.nodes_s, self.postgres_s, self.wall_s = self.sample()

    def sample(self) -> tuple[list[float], float, float]:
        """(each node's CPU seconds, PostgreSQL's backends' CPU seconds, now)."""
        nodes = [process_cpu_s(pid) or 0.0 for pid in self.pids]
        return nodes, children_cpu_s(self.pg_pid) or 0.0, time.perf_counter()

    def busy(self) -> dict[str, Any]:
        """``nodes_cpu_busy`` (each node), ``postgres_cpu_busy`` and the nodes' CPU seconds (``nodes_cpu_s``)."""
        nodes, postgres, wall = self.sample()
        elapsed = wall - self.wall_s
        return {
            "nodes_cpu_busy": [round((a - b) / elapsed, 3) for a, b in zip(nodes, self.nodes_s, strict=True)],
            "postgres_cpu_busy": round((postgres - self.postgres_s) / elapsed, 3),
            "nodes_cpu_s": sum(nodes) - sum(self.nodes_s),
            "wall_s": elapsed,
        }


async def closed(target: Target, nodes: Nodes, args: argparse.Namespace, pg_pid: int) -> dict[str, Any]:
    """The closed loop: pairs/s (the arm's maximum) and who was busy."""
    watch = CpuWatch(nodes.pids(), pg_pid)
    pairs = Retries(target, "b", args.http_accounts)
    run = await closed_loop(target, args.http_concurrency, args.http_seconds, args.http_warmup_s, pairs.step)
    cpu = watch.busy()
    pairs_per_s = run["done"] / run["window_s"]
    return {
        "pairs_per_s": round(pairs_per_s),
        "billing_requests_per_s": round(2 * pairs_per_s),
        "window_s": run["window_s"],
        "retried_503": pairs.retried,
        "generator_cpu_busy": run["generator_cpu_busy"],
        "nodes_cpu_busy": cpu["nodes_cpu_busy"],
        # CPU of all nodes per pair, over the whole loop (warm-up included, as the CPU figures)
        "nodes_cpu_ms_per_pair": round(1000 * cpu["nodes_cpu_s"] / max(1e-9, pairs_per_s * cpu["wall_s"]), 2),
        "postgres_cpu_busy": cpu["postgres_cpu_busy"],
    }


async def opened(target: Target, nodes: Nodes, rate: float, args: argparse.Namespace, pg_pid: int) -> dict[str, Any]:
    """The open loop at ``rate`` pairs/s: reserve latency from each pair's due time, and the generator's lag."""
    watch = CpuWatch(nodes.pids(), pg_pid)
    with niceness(args.generator_nice) as nice:
        phase = await open_loop(target, rate, args.http_seconds, args.http_concurrency, args.http_accounts)
    cpu = watch.busy()
    phase = {key: value for key, value in phase.items() if not key.startswith("server_")}  # no single server here
    phase |= {k: cpu[k] for k in ("nodes_cpu_busy", "postgres_cpu_busy")}
    return {"share": OPEN_LOOP_SHARE} | phase | {"generator_nice": nice}


@contextlib.contextmanager
def niceness(nice: int) -> Iterator[int]:
    """Run the calling thread (the generator's event loop) at ``nice`` inside the block, if allowed; yields it.

    A negative value (root only) lets the open loop's generator preempt the nodes and
    PostgreSQL on a shared machine, as a generator on a machine of its own would never wait
    for them; refused, the block runs at the niceness it had, and that is what is reported.
    """
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # on Linux: this thread only
    except PermissionError:
        yield before
        return
    try:
        yield nice
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


@contextlib.asynccontextmanager
async def serving(url: str, root: Path, arm: Arm, ttl_ms: int, tokens: Tokens) -> AsyncIterator[Nodes]:
    """A fresh eight-shard cluster in database ``url`` served as ``arm`` says, settled; its nodes killed after."""
    await create_cluster(url)
    if arm.shared_port:
        nodes = await start_processes(f"proc{arm.count}", arm.count, url, root, ttl_ms=ttl_ms, token=tokens.admin)
    else:
        names = [f"http{arm.count}-{i}" for i in range(arm.count)]
        nodes = await start_nodes(names, url, root, ttl_ms, tokens.admin)
    try:
        yield nodes
    finally:
        nodes.stop()


async def http_arm(nodes: Nodes, arm: Arm, args: argparse.Namespace, pg_pid: int, tokens: Tokens) -> dict[str, Any]:
    """Fund the accounts, then the closed loop and the open loop at half its rate through ``nodes``."""
    await fund(nodes.urls, tokens.admin, [account_name(index) for index in range(args.http_accounts)])
    target = Spread("127.0.0.1", nodes.ports[0], tokens.gateway, tokens.admin, ports=nodes.ports)
    top = await closed(target, nodes, args, pg_pid)
    tail = await opened(target, nodes, OPEN_LOOP_SHARE * top["pairs_per_s"], args, pg_pid)
    valid = tail["valid"]
    return (
        {"arm": arm.name, "nodes": arm.count, "shared_port": arm.shared_port}
        | top
        | {
            "open_loop": tail,
            "reserve_p50_ms_at_50pct": tail["reserve_p50_ms"] if valid else None,
            "reserve_p99_ms_at_50pct": tail["reserve_p99_ms"] if valid else None,
        }
    )
