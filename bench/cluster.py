"""Cluster mode's figures: one shard's engine on PostgreSQL against the file WAL, HTTP pairs, failover times.

``python bench/cluster.py --json`` prints one JSON object; without ``--json`` a table. In one run:

- ``engine``: the same load (``--commands`` reserves from ``--concurrency`` callers, one event
  each) through one :class:`~tollway.engine.Engine` on the file WAL (fsync, the sync helper) and
  through one shard's engine on an embedded PostgreSQL (fsync and ``synchronous_commit`` on),
  each with group commit: events/s and their ratio ``pg_over_file_wal`` (CLUSTER.md's target:
  ≥ 0.5).
- ``http``: reserve → commit pairs over HTTP through one node, two nodes on two ports, and
  ``tollway serve --processes 2`` (two nodes on one port), each a fresh eight-shard cluster:
  the closed-loop maximum (pairs/s) and the reserve latency at half of it in an open loop,
  counted from each pair's due time, with the generator's own lag (``bench/cluster_http.py``).
  A client that does not route sends a pair to any node, so with two nodes about half of the
  requests are forwarded one hop.
- ``failover``: ``kill -9`` of a node, its shard answering again through the survivor, against
  the lease time (target: ≤ lease + 2 s); ``pg_failover``: ``kill -9`` of the PostgreSQL
  primary, its synchronous standby promoted, until every shard acknowledges a reserve again
  (``bench/cluster_failover.py``).

PostgreSQL, the nodes and this process share the machine's cores; every number is measured by
the run, nothing is hard-coded. This process runs on uvloop, as the nodes do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

import asyncpg
import uvloop

from tollway import Engine, Settings
from tollway.cluster.shard_log import start_shard_engine
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind
from tollway.pg import leases
from tollway.pg.log import PgLog
from tollway.pg.pool import open_pool
from tollway.pg.schema import init_cluster
from tollway.pg.server import EmbeddedPostgres

if __package__ in (None, ""):  # run as a script: make the repository root importable for bench.*
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # http.py would shadow the stdlib's http
from bench.cluster_failover import node_failover, pg_failover
from bench.cluster_http import ARMS, Arm, http_arm, serving
from bench.cluster_nodes import issue_tokens
from bench.load import GENERATOR_LAG_P99_MS_MAX, wrk_version
from bench.machine import add_scratch_arguments, emit, loadavg, machine_facts, scratch_dir

ACCOUNTS: Final = [f"bench-{i}" for i in range(64)]
FAILOVER_ARM: Final = Arm(2)  # whose nodes the node failover kills one of


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


async def measure_async(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    phases_s: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        phases_s[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    tokens = issue_tokens(root)
    wal = await file_wal_engine(root / "wal", args.commands, args.concurrency)
    async with EmbeddedPostgres(root / "pg") as server:
        admin = await asyncpg.connect(server.url)
        try:
            for name in ("engine_bench", *(f"http_bench_{n}" for n in range(len(ARMS)))):
                await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        base = server.url.rsplit("/", 1)[0]
        pg = await pg_engine(f"{base}/engine_bench", args.commands, args.concurrency)
        lap("engine")
        assert server.pid is not None
        http = []
        for number, arm in enumerate(ARMS):
            async with serving(f"{base}/http_bench_{number}", root, arm, args.lease_ttl_ms, tokens) as nodes:
                http.append(await http_arm(nodes, arm, args, server.pid, tokens))
                lap(f"http {arm.name}")
                if arm == FAILOVER_ARM:  # the node failover on these nodes, once their loops are done
                    down = await node_failover(nodes, tokens.admin, args.lease_ttl_ms)
                    lap("node failover")
    pg_down = await pg_failover(root, args.lease_ttl_ms, tokens)
    lap("pg failover")
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
            "generator": {"closed_loop": "python", "open_loop": "python", "wrk": wrk_version()},
            "generator_lag_p99_ms_max": GENERATOR_LAG_P99_MS_MAX,
            "runs": http,
            "two_over_one": round(http[1]["pairs_per_s"] / http[0]["pairs_per_s"], 3),
            "processes_over_one": round(http[2]["pairs_per_s"] / http[0]["pairs_per_s"], 3),
        },
        "failover": down,
        "pg_failover": pg_down,
        "phases_s": phases_s,
    }


def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() == 0:
        root.chmod(0o755)  # as root the server runs as nobody, who must reach its directory
    load_before, started = loadavg(), time.perf_counter()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(measure_async(root, args))
    run_s = round(time.perf_counter() - started, 1)
    out["machine"] = {**machine_facts(root), "loadavg_before": load_before, "loadavg_after": loadavg(), "run_s": run_s}
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
            f"  {run['arm']:11} {run['pairs_per_s']:>7} pairs/s  generator CPU {run['generator_cpu_busy']}"
            f"  nodes CPU {run['nodes_cpu_busy']} ({run['nodes_cpu_ms_per_pair']} ms/pair)"
            f"  PostgreSQL CPU {run['postgres_cpu_busy']}"
        )
        tail = run["open_loop"]
        verdict = "" if tail["valid"] else "  INVALID: the generator lagged"
        print(
            f"  {'':11} at {tail['rate_pairs_per_s']} pairs/s: reserve p50 {tail['reserve_p50_ms']} ms,"
            f" p99 {tail['reserve_p99_ms']} ms; generator lag p99 {tail['generator_lag_p99_ms']} ms{verdict}"
        )
    print(f"  2 nodes / 1 node = {http['two_over_one']}, 2 processes / 1 node = {http['processes_over_one']}")
    down = out["failover"]
    print(f"kill -9 of a node to answering again: {down['kill_to_answer_s']} s (lease {down['lease_ttl_s']} s)")
    pg = out["pg_failover"]
    print(
        f"kill -9 of the PostgreSQL primary, standby promoted after {pg['kill_to_promoted_s']} s: first reserve"
        f" acknowledged after {pg['kill_to_first_ack_s']} s, every shard after {pg['kill_to_all_shards_ack_s']} s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Cluster mode: PostgreSQL log, HTTP pairs, failover times.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--commands", type=int, default=None, help="reserves per engine (default 20000; quick 500)")
    parser.add_argument("--concurrency", type=int, default=256, help="concurrent callers (default 256)")
    parser.add_argument("--lease-ttl-ms", type=int, default=None, help="the nodes' lease (default 5000; quick 2000)")
    parser.add_argument("--http-seconds", type=float, default=None, help="each HTTP loop (default 10; quick 1)")
    parser.add_argument("--http-warmup-s", type=float, default=None, help="HTTP warm-up per arm (default 2; quick 0.5)")
    parser.add_argument("--http-concurrency", type=int, default=None, help="HTTP connections (default 64; quick 16)")
    parser.add_argument(
        "--http-accounts", type=int, default=None, help="funded accounts for HTTP (default 64; quick 16)"
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=0,
        help="niceness of the open loop's generator (default 0; root: e.g. -10)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    add_scratch_arguments(parser)
    args = parser.parse_args(argv)
    args.commands = args.commands or (500 if args.quick else 20_000)
    args.lease_ttl_ms = args.lease_ttl_ms or (2_000 if args.quick else 5_000)
    args.http_seconds = args.http_seconds or (1.0 if args.quick else 10.0)
    args.http_warmup_s = args.http_warmup_s or (0.5 if args.quick else 2.0)
    args.http_concurrency = args.http_concurrency or (16 if args.quick else 64)
    args.http_accounts = args.http_accounts or (16 if args.quick else 64)
    with scratch_dir(args.data_dir, "cluster-", args.keep) as root:
        emit(measure(root, args), args.json, print_table)


if __name__ == "__main__":
    main()
