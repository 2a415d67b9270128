"""Cluster mode's figures: one shard's engine on PostgreSQL against the file WAL, and failover time.

``python bench/cluster.py --json`` prints one JSON object; without ``--json`` a table. In one run:

- ``engine``: the same load (``--commands`` reserves from ``--concurrency`` callers, one event
  each) through one :class:`~tollway.engine.Engine` on the file WAL (fsync, the sync helper) and
  through one shard's engine on an embedded PostgreSQL (fsync and ``synchronous_commit`` on),
  each with group commit: events/s and their ratio ``pg_over_file_wal`` (CLUSTER.md's target:
  ≥ 0.5).
- ``http``: total reserve → commit pairs/s over HTTP through one node, then through two nodes
  (eight shards, a fresh cluster each): ``--http-concurrency`` keep-alive connections spread
  over the nodes, each looping pairs on ``--http-accounts`` funded accounts for
  ``--http-seconds`` (after a warm-up). A client that does not route sends a pair to any node,
  so with two nodes about half of the requests are forwarded one hop. The report gives the
  CPU busy share (CPU time over wall time, 1.0 = one core) of the load generator (this
  process), of each node and of PostgreSQL's backends over the window.
- ``failover``: a two-node cluster of real ``tollway serve --postgres-url`` processes on
  loopback; ``kill -9`` of the node that owns an account's shard, then a read of that account
  through the survivor every 20 ms until it answers: ``kill_to_answer_s`` against the lease
  time (target: ≤ lease + 2 s).

PostgreSQL, the nodes and this process share the machine's cores; every number is measured by
the run, nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg

from tollway import Engine, Settings
from tollway.cluster.shard_log import start_shard_engine
from tollway.core import commands as cmd
from tollway.core.assignment import assign
from tollway.core.commands import CreditKind
from tollway.core.shard import shard
from tollway.pg import leases
from tollway.pg.log import PgLog
from tollway.pg.pool import open_pool
from tollway.pg.schema import init_cluster
from tollway.pg.server import EmbeddedPostgres

if __package__ in (None, ""):  # run as a script: make the repository root importable for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load import (
    FUNDING_MICRO,
    BenchError,
    Connection,
    Target,
    Usage,
    account_name,
    children_cpu_s,
    closed_loop,
    commit_request,
    process_cpu_s,
    reserve_request,
)
from bench.machine import add_scratch_arguments, emit, loadavg, machine_facts, scratch_dir

ACCOUNTS: Final = [f"bench-{i}" for i in range(64)]
START_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.02
HTTP_NODES: Final = (1, 2)
RETRY_S: Final = 0.05
RETRY_503_S: Final = 60.0
UNAVAILABLE: Final = 503
ENTRY_ID: Final = re.compile(rb'"billing_entry_id":"([0-9A-Z]{26})"')


async def drive(engine: Engine, commands: int, concurrency: int) -> dict[str, Any]:
    """``commands`` reserves from ``concurrency`` callers; events/s of the whole run."""
    for account in ACCOUNTS:
        await engine.execute(cmd.Credit(account, "seed", CreditKind.MINT, 10**12))
    todo = iter(range(commands))

    async def caller() -> None:
        for n in todo:
            await engine.execute(cmd.Reserve(ACCOUNTS[n % len(ACCOUNTS)], f"r{n}", 10, ttl_s=3_600))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed_s = time.perf_counter() - started
    return {"events": commands, "seconds": round(elapsed_s, 3), "events_per_s": round(commands / elapsed_s)}


async def file_wal_engine(directory: Path, commands: int, concurrency: int) -> dict[str, Any]:
    async with Engine.open(directory, Settings(snapshot_every_events=10**9)) as engine:
        return await drive(engine, commands, concurrency)


async def pg_engine(url: str, commands: int, concurrency: int) -> dict[str, Any]:
    pool = await open_pool(url, max_size=4, timeout_s=10)  # as a node's pool
    try:
        async with pool.acquire() as connection:
            await init_cluster(connection, shards=1)
        lease = await leases.acquire(pool, 0, "bench", 600_000, time.monotonic_ns() // 1_000_000)
        assert lease is not None
        engine = await start_shard_engine(PgLog(pool, 0), lease.epoch, Settings(snapshot_every_events=10**9))
        try:
            return await drive(engine, commands, concurrency)
        finally:
            await engine.close()
    finally:
        await pool.close()


def start_node(name: str, url: str, root: Path, ttl_ms: int) -> tuple[subprocess.Popen[bytes], Path]:
    out = root / f"{name}.out"
    argv = [sys.executable, "-m", "tollway.cli", "serve", "--postgres-url", url, "--data-dir", str(root / "keys")]
    argv += ["--host", "127.0.0.1", "--port", "0", "--node-id", name, "--lease-ttl-ms", str(ttl_ms)]
    argv += ["--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    with out.open("w") as stdout, out.with_suffix(".err").open("w") as stderr:
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=root)
    return process, out


async def node_url(out: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        for line in out.read_text().splitlines():  # noqa: ASYNC240 - a few lines of a local file
            if "serving on " in line:
                return line.split("serving on ", 1)[1].split()[0]
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"node did not start: {out.read_text()[-2000:]}")  # noqa: ASYNC240 - failing anyway


async def get(url: str, path: str, token: str) -> tuple[int, Any]:
    """A plain HTTP/1.1 GET (``bench/http.py`` shadows the standard ``http`` package for scripts here)."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else None


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


async def failover(url: str, root: Path, ttl_ms: int) -> dict[str, Any]:
    """Seconds from kill -9 of a shard's owner to the survivor answering for it."""
    cli("cluster", "init", "--postgres-url", url, "--shards", "8")
    token = cli("token", "issue", "--new-key", "--data-dir", str(root / "keys"), "--scope", "admin")
    nodes = [start_node(name, url, root, ttl_ms) for name in ("a", "b")]
    try:
        urls = [await node_url(out, process) for process, out in nodes]
        victim_shards = await settled_shards_of(urls, token)
        account = next(a for a in ACCOUNTS if shard(a, 8) in victim_shards)
        nodes[1][0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while (await get(urls[0], f"/v1/accounts/{account}", token))[0] != 200:  # noqa: ASYNC110 - polling HTTP
            await asyncio.sleep(POLL_S)
        answered_s = time.monotonic() - killed
    finally:
        for process, _ in nodes:
            process.kill()
            process.wait()
    return {"lease_ttl_s": ttl_ms / 1000, "kill_to_answer_s": round(answered_s, 3)}


async def settled_shards_of(urls: list[str], token: str) -> set[int]:
    """Once all eight shards are served, the shards of the second node."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        views = [(await get(u, "/v1/cluster", token))[1] for u in urls]
        if sum(len(v["serving"]) for v in views) == 8 and views[1]["serving"]:
            return set(views[1]["serving"])
        await asyncio.sleep(0.1)
    raise RuntimeError("the cluster did not settle")


@dataclass(frozen=True)
class Spread(Target):
    """A target whose connections go to each node in turn (``ports``), as a client that does not route."""

    ports: tuple[int, ...] = ()
    turn: Iterator[int] = field(default_factory=itertools.count)

    async def connect(self) -> Connection:
        """A keep-alive connection to the next node."""
        port = self.ports[next(self.turn) % len(self.ports)]
        _, protocol = await asyncio.get_running_loop().create_connection(Connection, self.host, port)
        return protocol


async def post(url: str, path: str, token: str, body: dict[str, Any]) -> int:
    """A plain HTTP/1.1 POST; its status."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + data)
        answer = await reader.read()
    finally:
        writer.close()
    return int(answer.split(maxsplit=2)[1])


async def post_until_served(url: str, path: str, token: str, body: dict[str, Any]) -> int:
    """:func:`post`, again while it answers 503 (a shard still moving on a loaded machine), up to a minute."""
    deadline = time.monotonic() + RETRY_503_S
    status = await post(url, path, token, body)
    for _ in itertools.count():
        if status != UNAVAILABLE or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
        status = await post(url, path, token, body)
    return status


async def settled(urls: list[str], names: list[str], token: str, shards: int) -> None:
    """Wait until each node serves exactly the shards :func:`assign` gives it."""
    target = assign(shards, names)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        views = [(await get(u, "/v1/cluster", token))[1] for u in urls]
        served = {number: name for name, view in zip(names, views, strict=True) for number in view["serving"]}
        if served == target and sum(len(view["serving"]) for view in views) == shards:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the cluster did not settle")


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


async def http_pairs(url: str, root: Path, count: int, args: argparse.Namespace, pg_pid: int) -> dict[str, Any]:
    """Pairs/s over HTTP through ``count`` fresh nodes of a fresh eight-shard cluster in database ``url``."""
    cli("cluster", "init", "--postgres-url", url, "--shards", "8")
    keys = str(root / "keys")
    admin = cli("token", "issue", "--new-key", "--data-dir", keys, "--scope", "admin")
    gateway = cli("token", "issue", "--new-key", "--data-dir", keys, "--scope", "gateway")
    nodes = [start_node(f"http{count}-{i}", url, root, args.lease_ttl_ms) for i in range(count)]
    try:
        urls = [await node_url(out, process) for process, out in nodes]
        await settled(urls, [f"http{count}-{i}" for i in range(count)], admin, 8)
        for index in range(args.http_accounts):
            credit = {"credit_id": "seed", "kind": "mint", "amount_micro": FUNDING_MICRO}
            status = await post_until_served(
                urls[index % count], f"/v1/accounts/{account_name(index)}/credits", admin, credit
            )
            if status != 201:
                raise BenchError(f"funding answered {status}")
        ports = tuple(int(u.rsplit(":", 1)[1].rstrip("/")) for u in urls)
        target = Spread("127.0.0.1", ports[0], gateway, admin, ports=ports)
        pids = [process.pid for process, _ in nodes]
        before = [process_cpu_s(pid) or 0.0 for pid in pids], children_cpu_s(pg_pid) or 0.0, Usage.now()
        pairs = Retries(target, "b", args.http_accounts)
        run = await closed_loop(target, args.http_concurrency, args.http_seconds, args.http_warmup_s, pairs.step)
        wall_s = Usage.now().wall_s - before[2].wall_s
    finally:
        after = [process_cpu_s(process.pid) or 0.0 for process, _ in nodes], children_cpu_s(pg_pid) or 0.0
        for process, _ in nodes:
            process.kill()
            process.wait()
    pairs_per_s = run["done"] / run["window_s"]
    return {
        "nodes": count,
        "pairs_per_s": round(pairs_per_s),
        "billing_requests_per_s": round(2 * pairs_per_s),
        "window_s": run["window_s"],
        "retried_503": pairs.retried,
        "generator_cpu_busy": run["generator_cpu_busy"],
        "nodes_cpu_busy": [round((a - b) / wall_s, 3) for a, b in zip(after[0], before[0], strict=True)],
        # CPU of all nodes per pair, over the whole loop (warm-up included, as the CPU figures)
        "nodes_cpu_ms_per_pair": round(1000 * (sum(after[0]) - sum(before[0])) / (pairs_per_s * wall_s), 2),
        "postgres_cpu_busy": round((after[1] - before[1]) / wall_s, 3),
    }


async def measure_async(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    wal = await file_wal_engine(root / "wal", args.commands, args.concurrency)
    async with EmbeddedPostgres(root / "pg") as server:
        admin = await asyncpg.connect(server.url)
        try:
            await admin.execute("CREATE DATABASE engine_bench")
            await admin.execute("CREATE DATABASE failover_bench")
            for count in HTTP_NODES:
                await admin.execute(f"CREATE DATABASE http_bench_{count}")
        finally:
            await admin.close()
        base = server.url.rsplit("/", 1)[0]
        pg = await pg_engine(f"{base}/engine_bench", args.commands, args.concurrency)
        assert server.pid is not None
        http = [await http_pairs(f"{base}/http_bench_{n}", root, n, args, server.pid) for n in HTTP_NODES]
        down = await failover(f"{base}/failover_bench", root, args.lease_ttl_ms)
    return {
        "engine": {
            "commands": args.commands,
            "concurrency": args.concurrency,
            "file_wal": wal,
            "pg": pg,
            "pg_over_file_wal": round(pg["events_per_s"] / wal["events_per_s"], 3),
        },
        "http": {
            "concurrency": args.http_concurrency,
            "accounts": args.http_accounts,
            "runs": http,
            "two_over_one": round(http[1]["pairs_per_s"] / http[0]["pairs_per_s"], 3),
        },
        "failover": down,
    }


def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() == 0:
        root.chmod(0o755)  # as root the server runs as nobody, who must reach its directory
    load_before = loadavg()
    out = asyncio.run(measure_async(root, args))
    out["machine"] = {**machine_facts(root), "loadavg_before": load_before, "loadavg_after": loadavg()}
    out["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return out


def print_table(out: dict[str, Any]) -> None:
    engine = out["engine"]
    print(f"{engine['commands']} reserves from {engine['concurrency']} callers, one engine")
    for name in ("file_wal", "pg"):
        print(f"  {name:9} {engine[name]['events_per_s']:>9} events/s")
    print(f"  pg / file WAL = {engine['pg_over_file_wal']}")
    http = out["http"]
    print(f"reserve -> commit pairs over HTTP, {http['concurrency']} connections spread over the nodes")
    for run in http["runs"]:
        print(
            f"  {run['nodes']} node(s) {run['pairs_per_s']:>7} pairs/s  generator CPU {run['generator_cpu_busy']}"
            f"  nodes CPU {run['nodes_cpu_busy']} ({run['nodes_cpu_ms_per_pair']} ms/pair)"
            f"  PostgreSQL CPU {run['postgres_cpu_busy']}"
        )
    down = out["failover"]
    print(f"kill -9 to answering again: {down['kill_to_answer_s']} s (lease {down['lease_ttl_s']} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Cluster mode: PostgreSQL log against the file WAL; failover.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--commands", type=int, default=None, help="reserves per engine (default 20000; quick 500)")
    parser.add_argument("--concurrency", type=int, default=256, help="concurrent callers (default 256)")
    parser.add_argument("--lease-ttl-ms", type=int, default=None, help="the nodes' lease (default 5000; quick 2000)")
    parser.add_argument("--http-seconds", type=float, default=None, help="HTTP window per run (default 10; quick 2)")
    parser.add_argument("--http-warmup-s", type=float, default=None, help="HTTP warm-up per run (default 2; quick 1)")
    parser.add_argument("--http-concurrency", type=int, default=64, help="HTTP connections (default 64)")
    parser.add_argument("--http-accounts", type=int, default=64, help="funded accounts for HTTP pairs (default 64)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    add_scratch_arguments(parser)
    args = parser.parse_args(argv)
    args.commands = args.commands or (500 if args.quick else 20_000)
    args.lease_ttl_ms = args.lease_ttl_ms or (2_000 if args.quick else 5_000)
    args.http_seconds = args.http_seconds or (2.0 if args.quick else 10.0)
    args.http_warmup_s = args.http_warmup_s or (1.0 if args.quick else 2.0)
    with scratch_dir(args.data_dir, "cluster-", args.keep) as root:
        emit(measure(root, args), args.json, print_table)


if __name__ == "__main__":
    main()
