"""HTTP benchmark of ``tollway serve``: billing throughput and latency against the bare stack.

``python bench/http.py --json`` prints one JSON object; without ``--json`` a short table. It
starts a real ``tollway serve`` (durability fsync, the embedded Redis, default settings, the
default log level) in a temporary data directory, pinned to CPU 0, and loads it from this
process pinned to CPU 1, so server and load generator never share a core. Phases, in order:

- **warm-up**: reserve → commit pairs for ``--warmup`` seconds (not reported);
- **bare**: ``GET /healthz`` — the service's no-op route, on the same server stack (uvicorn
  with httptools, the FastAPI app, its middleware and router) — in a closed loop at
  ``--concurrency`` connections: ``ceiling.bare_requests_per_s``, what tollway's app answers on
  one core when a request costs nothing else;
- **ASGI hello**: ``bench/hello.py``, a raw ASGI app on the same stack (uvicorn, httptools,
  uvloop), on the same core, with the same generator: ``ceiling.asgi_hello_requests_per_s``,
  what the stack itself answers; ``ratio`` divides the billing requests by it (issue 21's
  ceiling), ``ratio_vs_healthz`` by the ``/healthz`` figure;
- **billing**: ``--concurrency`` connections each looping ``POST /v1/reservations`` then
  ``POST /v1/reservations/{id}/commit`` (gateway token from ``tollway token issue``) against
  ``--accounts`` funded accounts: ``pairs_per_s`` and ``billing_requests_per_s`` (= 2 × pairs);
- **open loop**: pairs started on a fixed schedule at 80 % of the measured pair rate, each
  taking a free keep-alive connection (at most ``--concurrency``): ``reserve_p50_ms`` and
  ``reserve_p99_ms``, measured from the moment the pair was *due*, so a late start (no free
  connection, a slow server) counts as latency instead of hiding it.

Load generation is in ``bench/load.py`` (the wrk script in ``bench/wrk_pairs.lua``), the server
under test in ``bench/server.py``, the report in ``bench/report.py``; what each key means is in
``bench/README.md``. The closed-loop phases use ``wrk`` (HTTP/1.1 keep-alive, one thread; pairs through a small
Lua script) when it is installed and ``--generator`` allows it; otherwise, and always for
the open loop, a minimal HTTP/1.1 client on asyncio protocols (uvloop) in this process. The
report names the generator and how busy it and the server were (CPU time over wall time):
a generator near 1.0 means the figure is the generator's limit, not the server's.
"""
# ruff: noqa: A005 - the name the issue gives; this script imports nothing that needs the stdlib's http

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Final

import uvloop

if __package__ in (None, ""):  # run as a script: make the repository root importable for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load import (
    BenchError,
    bare_step,
    billing_step,
    closed_loop,
    open_loop,
    use_wrk,
    write_wrk_script,
    wrk_bare,
    wrk_pairs,
)
from bench.machine import add_scratch_arguments, emit, idle_cost, loadavg, scratch_dir, slow_windows, wakeup_latency
from bench.report import cpu_us_per_request, machine, print_table, summary
from bench.server import (
    SERVER_CPU,
    Server,
    WalWatch,
    add_setting_argument,
    can_pin,
    checked_settings,
    fund,
    served,
    served_hello,
    wait_ready,
)

OPEN_LOOP_SHARE: Final = 0.8
WAKEUP_PROBE_S: Final = 2.0
WAKEUP_PROBE_S_QUICK: Final = 0.2
IDLE_COST_ROUNDS: Final = 100  # about 1.5 s: each round sleeps 14.5 ms
IDLE_COST_ROUNDS_QUICK: Final = 10
SLOW_PROBE_S: Final = 6.0  # the slow windows seen on a shared VM came every 1.3-1.7 s
SLOW_PROBE_S_QUICK: Final = 0.3


# -- the run ---------------------------------------------------------------------------------


def measure(runner: asyncio.Runner, server: Server, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, bare, billing, open loop — against the running server."""
    target, conc = server.target, args.concurrency
    runner.run(wait_ready(target))
    runner.run(fund(target, args.accounts))
    runner.run(closed_loop(target, conc, args.warmup, 0.0, billing_step(target, "warm", args.accounts)))
    settle_s = 0.0 if args.quick else 0.5
    wal = WalWatch(runner, target)
    script = write_wrk_script(root / "pairs.lua")

    def billing_max(run: str) -> dict[str, Any]:
        if use_wrk(args.generator):
            return wal.around(lambda: wrk_pairs(target, conc, args.seconds, args.accounts, script))
        step = billing_step(target, run, args.accounts)
        return wal.around(lambda: runner.run(closed_loop(target, conc, args.seconds, settle_s, step)))

    if use_wrk(args.generator):
        bare = wal.around(lambda: wrk_bare(target, conc, args.seconds))
    else:
        bare = wal.around(lambda: runner.run(closed_loop(target, conc, args.seconds, settle_s, bare_step(target))))
    with served_hello(root, server.pinned) as hello:  # the stack's own ceiling, on the same core
        if use_wrk(args.generator):
            asgi_hello = wrk_bare(hello, conc, args.seconds)
        else:
            asgi_hello = runner.run(closed_loop(hello, conc, args.seconds, settle_s, bare_step(hello)))
    billing = billing_max("max")
    top = billing["done"] / billing["window_s"]

    def at(share: float) -> dict[str, Any]:
        pool = args.open_connections
        phase = wal.around(lambda: runner.run(open_loop(target, share * top, args.seconds, pool, args.accounts)))
        return {"share": share} | phase | {"server_cpu_us_per_pair": cpu_us_per_request(phase, share * top)}

    opened = at(OPEN_LOOP_SHARE)
    curve = [at(share) for share in args.curve]
    again = billing_max("again")  # the maximum once more: did the machine's speed drift during the run?
    again.pop("reserve_ns", None)
    measured = {"bare": bare, "asgi_hello": asgi_hello, "billing": billing, "open_loop": opened, "curve": curve}
    return measured | {"billing_again": again}


# -- command line ----------------------------------------------------------------------------


def _shares(text: str) -> list[float]:
    """``0.5,0.65`` → [0.5, 0.65]; each share in (0, 1.5]."""
    try:
        shares = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not shares or any(not 0 < share <= 1.5 for share in shares):
        raise argparse.ArgumentTypeError(f"shares must be in (0, 1.5]: {text!r}")
    return shares


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark tollway's HTTP API against the bare server stack.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=None, help="each measured phase (default 10; quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="billing warm-up (default 3; quick 0.3)")
    parser.add_argument("--concurrency", type=int, default=None, help="connections (default 64; quick 8)")
    parser.add_argument(
        "--open-connections",
        type=int,
        default=None,
        help="connections of the open-loop phases, at most (default: --concurrency)",
    )
    parser.add_argument("--accounts", type=int, default=None, help="funded accounts (default 1000; quick 20)")
    parser.add_argument(
        "--generator", choices=("auto", "wrk", "python"), default="auto", help="closed loops (auto: wrk if installed)"
    )
    parser.add_argument("--log-level", default="info", help="of the server (default info, as tollway serve)")
    parser.add_argument(
        "--wal-syncer",
        choices=("process", "thread"),
        default="process",
        help="the server's wal_syncer setting (default process, the production default; thread to compare)",
    )
    parser.add_argument(
        "--projection-pump",
        choices=("auto", "on", "off"),
        default="auto",
        help="the server's projection_pump setting (default auto: off on the one CPU the server is pinned to)",
    )
    add_setting_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--curve",
        type=_shares,
        default=[],
        help="more open-loop phases at these shares of the maximum, comma-separated (e.g. 0.5,0.65)",
    )
    add_scratch_arguments(parser, "the scratch directory (data and server.log)")
    args = parser.parse_args(argv)
    args.setting = checked_settings(parser, args.setting)
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else (1.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 3.0)
    args.concurrency = args.concurrency if args.concurrency is not None else (8 if quick else 64)
    args.open_connections = args.open_connections if args.open_connections is not None else args.concurrency
    args.accounts = args.accounts if args.accounts is not None else (20 if quick else 1000)
    if args.concurrency < 1 or args.open_connections < 1 or args.accounts < 1 or args.seconds <= 0:
        parser.error("--concurrency, --open-connections, --accounts and --seconds must be positive")
    return args


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    pinned = can_pin()
    before, started = loadavg(), time.perf_counter()
    wakeup = wakeup_latency(WAKEUP_PROBE_S_QUICK if args.quick else WAKEUP_PROBE_S, SERVER_CPU if pinned else None)
    wakeup |= idle_cost(IDLE_COST_ROUNDS_QUICK if args.quick else IDLE_COST_ROUNDS, SERVER_CPU if pinned else None)
    wakeup |= slow_windows(SLOW_PROBE_S_QUICK if args.quick else SLOW_PROBE_S, SERVER_CPU if pinned else None)
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        served(root, args.log_level, pinned, args.wal_syncer, args.projection_pump, settings=args.setting) as server,
    ):
        measured = measure(runner, server, root, args)
    out = summary(args, measured, server)
    out["ceiling"] |= wakeup
    out["machine"] = machine(root, pinned) | {
        "loadavg_before": before,
        "loadavg_after": loadavg(),
        "run_s": round(time.perf_counter() - started, 1),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch_dir(args.data_dir, ".tollway-bench-http-", args.keep) as root:
        out = run(args, root)
    if out["server"]["exit_code"] != 0:
        raise BenchError(f"tollway serve exited with {out['server']['exit_code']} (expected 0 after SIGTERM)")
    emit(out, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
