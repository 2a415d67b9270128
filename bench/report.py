"""The report of ``bench/http.py``: its JSON object and its short table.

Turns the measured phases into the headline figures (pairs per second, the ratio to the bare
stack, the open loop's reserve p50/p99), the ceilings, the targets and what ran; the meaning of
every key is in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Final

from bench.load import HEALTH_PATH, percentile_ms, use_wrk, wrk_version
from bench.machine import machine_facts
from bench.server import GENERATOR_CPU, SERVER_CPU, Server

TARGETS: Final[dict[str, float]] = {
    "billing_ratio_min": 0.5,
    "reserve_p99_ms_max_at_80pct": 10,
    "reserve_p99_ms_max_at_50pct": 10,
}


def p99_within(phase: dict[str, Any] | None, limit_ms: float) -> bool | None:
    """Whether an open-loop phase's reserve p99 is within ``limit_ms``; None when not run or its generator lagged."""
    if phase is None or not phase["valid"] or phase["reserve_p99_ms"] is None:
        return None
    return bool(phase["reserve_p99_ms"] <= limit_ms)


def summary(args: argparse.Namespace, measured: dict[str, Any], server: Server) -> dict[str, Any]:
    bare, billing, opened = measured["bare"], measured["billing"], measured["open_loop"]
    pairs_per_s = billing["done"] / billing["window_s"]
    bare_per_s = bare["done"] / bare["window_s"]
    hello = measured["asgi_hello"]
    hello_per_s = hello["done"] / hello["window_s"]
    ratio = 2 * pairs_per_s / hello_per_s
    again = measured["billing_again"]
    again_per_s = again["done"] / again["window_s"]
    p99 = opened["reserve_p99_ms"]
    closed_generator = "wrk" if use_wrk(args.generator) else "python"
    reserve_ns = billing.pop("reserve_ns")
    bare.pop("reserve_ns", None)
    bare["server_cpu_us_per_request"] = cpu_us_per_request(bare, bare_per_s)
    hello.pop("reserve_ns", None)
    hello["server_cpu_us_per_request"] = cpu_us_per_request(hello, hello_per_s)
    billing["server_cpu_us_per_request"] = cpu_us_per_request(billing, 2 * pairs_per_s)
    return {
        "pairs_per_s": round(pairs_per_s, 1),
        "billing_requests_per_s": round(2 * pairs_per_s, 1),
        "reserve_p50_ms": opened["reserve_p50_ms"],
        "reserve_p99_ms": p99,
        "ratio": round(ratio, 3),
        "ratio_vs_healthz": round(2 * pairs_per_s / bare_per_s, 3),
        "ceiling": {"bare_requests_per_s": round(bare_per_s, 1), "endpoint": f"GET {HEALTH_PATH}"}
        | bare
        | {"asgi_hello_requests_per_s": round(hello_per_s, 1), "asgi_hello": hello},
        "targets": TARGETS,
        "meets_targets": {
            "billing_ratio_min": ratio >= TARGETS["billing_ratio_min"],
            "reserve_p99_ms_max_at_80pct": p99_within(opened, TARGETS["reserve_p99_ms_max_at_80pct"]),
            "reserve_p99_ms_max_at_50pct": p99_within(
                next((point for point in measured["curve"] if point["share"] == HALF), None),
                TARGETS["reserve_p99_ms_max_at_50pct"],
            ),
        },
        "billing": billing
        | {
            "reserve_p50_ms_closed_loop": percentile_ms(reserve_ns, 50),
            "reserve_p99_ms_closed_loop": percentile_ms(reserve_ns, 99),
        },
        "open_loop": opened,
        "max_again": {
            "pairs_per_s": round(again_per_s, 1),
            "drift": round(again_per_s / pairs_per_s - 1, 3),
            "open_loop_share_of_it": round(opened["rate_pairs_per_s"] / again_per_s, 3),
            "server_cpu_us_per_request": cpu_us_per_request(again, 2 * again_per_s),
            "snapshots": again["snapshots"],
        },
        "open_loop_curve": [
            {key: point[key] for key in CURVE_KEYS} for point in sorted(measured["curve"], key=lambda p: p["share"])
        ],
        "generator": {"closed_loop": closed_generator, "open_loop": "python", "concurrency": args.concurrency},
        "server": {
            "command": "tollway serve --log-format json --log-level " + args.log_level,
            "durability": "fsync",
            "wal_syncer": args.wal_syncer,
            "projection_pump": args.projection_pump,
            "settings": args.setting,
            "redis": "embedded",
            "settlement": "standalone",
            "exit_code": server.exit_code,
        },
        "command": shlex.join(sys.orig_argv),
        "options": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "open_connections": args.open_connections,
            "accounts": args.accounts,
            "generator": args.generator,
            "quick": args.quick,
        },
    }


def cpu_us_per_request(phase: dict[str, Any], requests_per_s: float) -> float | None:
    """CPU time of the server and its children per request (steadier than throughput on a busy machine)."""
    own: float | None = phase["server_cpu_busy"]
    children: float | None = phase["server_children_cpu_busy"]
    if own is None or not requests_per_s:
        return None
    return round((own + (children or 0.0)) / requests_per_s * 1e6, 1)


HALF: Final = 0.5

CURVE_KEYS: Final = (
    "share",
    "rate_pairs_per_s",
    "reserve_p50_ms",
    "reserve_p99_ms",
    "start_lag_p99_ms",
    "generator_lag_p99_ms",
    "valid",
    "server_cpu_busy",
    "server_children_cpu_busy",
    "server_cpu_us_per_pair",
    "wal_events_per_batch",
    "snapshots",
)


def machine(data_dir: Path, pinned: bool) -> dict[str, Any]:
    return machine_facts(data_dir) | {
        "pinned": pinned,
        "server_cpu": SERVER_CPU if pinned else None,
        "generator_cpu": GENERATOR_CPU if pinned else None,
        "wrk": wrk_version(),
    }


def _verdict(met: bool | None) -> str:
    return "invalid: the generator lagged" if met is None else "ok" if met else "MISS"


def print_table(out: dict[str, Any]) -> None:
    met = out["meets_targets"]
    rows = [
        ("pairs_per_s", out["pairs_per_s"], ""),
        ("billing_requests_per_s", out["billing_requests_per_s"], ""),
        ("ceiling.bare_requests_per_s", out["ceiling"]["bare_requests_per_s"], ""),
        ("ceiling.asgi_hello_requests_per_s", out["ceiling"]["asgi_hello_requests_per_s"], ""),
        ("ratio to the ASGI hello (>= 0.5)", out["ratio"], "ok" if met["billing_ratio_min"] else "MISS"),
        ("ratio to /healthz", out["ratio_vs_healthz"], ""),
        ("reserve_p50_ms at 80 %", out["reserve_p50_ms"], ""),
        ("reserve_p99_ms at 80 % (<= 10)", out["reserve_p99_ms"], _verdict(met["reserve_p99_ms_max_at_80pct"])),
        ("generator_lag_p99_ms at 80 % (<= 1)", out["open_loop"]["generator_lag_p99_ms"], ""),
        ("ceiling.wakeup_p99_ms", out["ceiling"]["wakeup_p99_ms"], ""),
        ("ceiling.idle_cost_ratio (3 ms)", out["ceiling"]["idle_cost_ratio"]["3ms"], ""),
        ("ceiling.slow_share", out["ceiling"]["slow_share"], ""),
        ("server CPU busy (billing)", out["billing"]["server_cpu_busy"], ""),
        ("generator CPU busy (billing)", out["billing"]["generator_cpu_busy"], ""),
    ]
    for name, value, verdict in rows:
        print(f"{name:<32} {value!s:>12}  {verdict}")
    for point in out["open_loop_curve"]:
        share = f"{point['share']:.0%}"
        print(f"{'reserve p50/p99 ms at ' + share:<32} {point['reserve_p50_ms']!s:>5}/{point['reserve_p99_ms']!s:<6}")
    print(
        f"generator: {out['generator']}; machine: {out['machine']['cpu_count']} CPUs, pinned {out['machine']['pinned']}"
    )
    print(f"command: {out['command']}")
