"""``tollway serve --postgres-url URL --processes 2``: two nodes on one port, supervised (issue 19 §3).

A real parent process starts two children sharing one port (``SO_REUSEPORT``). Both answer on
that port and both hold shards. ``kill -9`` of a child: its shards answer again under a new
epoch, the parent restarts the child under the same node id (its supervision policy), and the
restarted child gets its share back; nothing acknowledged is lost or doubled. SIGTERM to the
parent: every child hands its shards off (every lease released) and the parent exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import pytest

from tests.cluster_support import Cluster, run_cli
from tests.e2e_support import LOOPBACK, Process, ProcessFailed, tollway_argv
from tests.test_cluster_nodes import ACCOUNTS, Load, Traffic, mint_all
from tollway.core.assignment import assign
from tollway.core.shard import shard

SHARDS: Final = 8
LEASE_TTL_MS: Final = 2_000
FUNDED_MICRO: Final = 1_000_000
SETTLE_TIMEOUT_S: Final = 90.0
NODES: Final = ["m-0", "m-1"]

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Endpoint:
    """Where the load sends requests (the shared port): what :class:`Load` needs of a node."""

    name: str
    url: str


async def started(parent: Process, node_id: str, after_pid: int = 0) -> int:
    """The pid of the newest start of ``node_id`` the parent reported (other than ``after_pid``)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        pids = [int(p) for p in re.findall(rf"node {node_id} started \(pid (\d+)\)", parent.output())]
        if pids and pids[-1] != after_pid:
            return pids[-1]
        if parent.popen.poll() is not None or time.monotonic() > deadline:
            raise ProcessFailed(f"{node_id} not (re)started: {parent.describe()}")
        await asyncio.sleep(0.05)


async def view(client: httpx.AsyncClient, url: str, cluster: Cluster) -> dict[str, Any] | None:
    """``GET /v1/cluster`` on a new connection (so the kernel picks a child afresh), or None."""
    with contextlib.suppress(httpx.HTTPError):
        response = await client.get(f"{url}/v1/cluster", headers={**cluster.auth(), "Connection": "close"})
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
    return None


async def settled(client: httpx.AsyncClient, url: str, cluster: Cluster) -> dict[int, str]:
    """Wait until the shard map is assign()'s over both children and each child serves its share."""
    target = assign(SHARDS, NODES)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        seen = await view(client, url, cluster)
        if seen is not None and {row["shard"]: row["owner"] for row in seen["shard_map"]} == target:
            served: dict[int, str] = {}
            for node in seen["nodes"]:
                own = await view(client, node["advertise_url"], cluster)
                served |= dict.fromkeys((own or {}).get("serving", []), node["node_id"])
            if served == target:
                return target
        await asyncio.sleep(0.2)
    raise ProcessFailed(f"the shards never settled over {NODES}")


async def test_two_processes_share_a_port_and_a_killed_one_is_restarted(pg_url: str, tmp_path: Path) -> None:
    """--processes 2: one port, both hold shards; kill -9 of one: shards answer again, it restarts; SIGTERM: exit 0."""
    cluster = Cluster(pg_url, tmp_path, shards=SHARDS, lease_ttl_ms=LEASE_TTL_MS)
    argv = ["serve", "--postgres-url", pg_url, "--data-dir", str(cluster.data_dir), "--host", LOOPBACK, "--port", "0"]
    argv += ["--processes", "2", "--node-id", "m", "--lease-ttl-ms", str(LEASE_TTL_MS), "--log-level", "warning"]
    parent = Process("parent", tollway_argv(*argv), tmp_path)
    try:
        line = await parent.wait_for_output("nodes sharing ")
        url = "http://" + line.split("nodes sharing ", 1)[1].split()[0]
        victim_pid = await started(parent, "m-1")
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            owners = await settled(client, url, cluster)
            answering = {(await view(client, url, cluster) or {}).get("node_id") for _ in range(40)}
            load = Load(cluster, client, [Endpoint("shared", url)])  # type: ignore[list-item]
            await mint_all(load, FUNDED_MICRO)
            traffic = Traffic(load, cluster.gateway)
            workers = [asyncio.create_task(traffic.worker(n)) for n in range(8)]
            await asyncio.sleep(1.0)
            orphan = next(a for a in ACCOUNTS if owners[shard(a, SHARDS)] == "m-1")
            before = (await load.send("GET", f"/v1/accounts/{orphan}")).headers["x-tollway-answered-by"]
            os.kill(victim_pid, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.sleep(0.2)
            after = (await load.send("GET", f"/v1/accounts/{orphan}")).headers["x-tollway-answered-by"]
            answered_again_s = time.monotonic() - killed
            restarted_pid = await started(parent, "m-1", after_pid=victim_pid)
            await settled(client, url, cluster)
            traffic.stop.set()
            await asyncio.gather(*workers)
            await traffic.check_balances(FUNDED_MICRO)
        code = await parent.stop(signal.SIGTERM, timeout_s=120)
    finally:
        parent.kill()
    connection = await asyncpg.connect(pg_url)
    try:
        held = await connection.fetchval("SELECT count(*) FROM tollway.leases WHERE owner IS NOT NULL")
        registered = await connection.fetchval("SELECT count(*) FROM tollway.nodes")
    finally:
        await connection.close()
    audit = run_cli("cluster", "audit", "--postgres-url", pg_url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr
    assert {"m-0", "m-1"} == set(owners.values())
    assert {"m-0", "m-1"} == answering  # the kernel spreads connections to the shared port over both
    assert before.split()[0] == "m-1"
    assert int(after.split()[2]) > int(before.split()[2])  # a new lease epoch: the shard moved
    assert answered_again_s < LEASE_TTL_MS / 1000 + 15.0, answered_again_s
    assert restarted_pid != victim_pid
    assert "node m-1 exited (signal SIGKILL); restarting it" in parent.err_path.read_text()
    assert ([], 0, 0, 0) == (load.other_failures, code, held, registered), parent.describe()
