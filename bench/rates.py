"""CPU per pair of ``tollway serve`` at fixed rates, per process and thread: where a pair's CPU goes as the rate falls.

``python bench/rates.py --json`` starts the server as ``bench/http.py`` does (durability fsync,
the embedded Redis, default settings; pinned to CPU 0, this generator to CPU 1), funds the
accounts, warms it up with a closed loop, then runs one open-loop phase at each of ``--rates``
pairs per second (default 300, 600, 1200, 2000; reserve then commit, due on a fixed schedule as
in ``bench/http.py``). Per phase it reports the reserve p50/p99 and, for the server's main
thread, its other threads and each child process (the embedded redis-server, the WAL sync
helper), read from ``/proc/<pid>/task/<tid>/sched``: the share of a core, CPU per pair, and
voluntary and involuntary context switches per pair. No target: it shows how each part's CPU
per pair rises as the rate falls (bench/README.md, "Why 80 % of the maximum can be a full
core"). Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Final

import uvloop

if __package__ in (None, ""):  # run as a script: make the repository root importable for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load import billing_step, child_pids, closed_loop, open_loop
from bench.machine import add_scratch_arguments, emit, scratch_dir
from bench.report import machine
from bench.server import add_setting_argument, can_pin, checked_settings, fund, served, wait_ready

DEFAULT_RATES: Final = (300.0, 600.0, 1200.0, 2000.0)
ACCOUNTS: Final = 200
CONNECTIONS: Final = 64
SCHED_FIELDS: Final = {
    "se.sum_exec_runtime": "cpu_ms",
    "nr_voluntary_switches": "voluntary",
    "nr_involuntary_switches": "involuntary",
}

Counters = dict[str, dict[str, float]]


def _descendants(pid: int) -> list[int]:
    found = child_pids(pid) or []
    return found + [grandchild for child in found for grandchild in _descendants(child)]


def _role(pid: int, server_pid: int) -> str:
    """What a process of the server's tree is, from its command line."""
    if pid == server_pid:
        return "server"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"pid {pid}"
    for marker, role in (("redis-server", "redis-server"), ("sync_helper", "sync helper"), ("redis.pump", "pump")):
        if marker in command:
            return role
    return f"pid {pid}"


def _sched(path: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        name, _, value = line.partition(":")
        key = SCHED_FIELDS.get(name.strip())
        if key is not None:
            values[key] = float(value)
    return values


def counters(server_pid: int) -> Counters:
    """Cumulative CPU and switches of the server's tree: ``"<role>"`` its main thread, ``"<role> threads"`` the rest."""
    totals: Counters = defaultdict(lambda: dict.fromkeys(SCHED_FIELDS.values(), 0.0))
    for pid in [server_pid, *_descendants(server_pid)]:
        role = _role(pid, server_pid)
        try:
            tids = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir() if entry.name.isdigit()]
        except OSError:
            continue
        for tid in tids:
            name = role if tid == pid else f"{role} threads"
            for key, value in _sched(Path(f"/proc/{pid}/task/{tid}/sched")).items():
                totals[name][key] += value
    return dict(totals)


def per_pair(before: Counters, after: Counters, seconds: float, pairs: int) -> dict[str, dict[str, float]]:
    """What each part spent during a phase: share of a core, CPU µs, and switches per pair."""
    out = {}
    for name, end in sorted(after.items()):
        start = before.get(name, dict.fromkeys(end, 0.0))
        cpu_ms = end["cpu_ms"] - start["cpu_ms"]
        out[name] = {
            "core_share": round(cpu_ms / 1000 / seconds, 3),
            "cpu_us_per_pair": round(cpu_ms * 1000 / max(pairs, 1), 1),
            "voluntary_switches_per_pair": round((end["voluntary"] - start["voluntary"]) / max(pairs, 1), 2),
            "involuntary_switches_per_pair": round((end["involuntary"] - start["involuntary"]) / max(pairs, 1), 2),
        }
    return out


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    pinned = can_pin()
    phases = []
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        served(root, "info", pinned, settings=args.setting) as server,
    ):
        target, pid = server.target, server.process.pid
        runner.run(wait_ready(target))
        runner.run(fund(target, ACCOUNTS))
        runner.run(closed_loop(target, CONNECTIONS, args.warmup, 0.0, billing_step(target, "warm", ACCOUNTS)))
        for rate in args.rates:
            before, started = counters(pid), time.perf_counter()
            phase = runner.run(open_loop(target, rate, args.seconds, CONNECTIONS, ACCOUNTS))
            elapsed, after = time.perf_counter() - started, counters(pid)
            parts = per_pair(before, after, elapsed, phase["completed"])
            phases.append(
                {
                    "rate_pairs_per_s": rate,
                    "achieved_pairs_per_s": phase["achieved_pairs_per_s"],
                    "reserve_p50_ms": phase["reserve_p50_ms"],
                    "reserve_p99_ms": phase["reserve_p99_ms"],
                    "core_busy": round(sum(part["core_share"] for part in parts.values()), 3),
                    "cpu_us_per_pair": round(sum(part["cpu_us_per_pair"] for part in parts.values()), 1),
                    "parts": parts,
                }
            )
    return {
        "phases": phases,
        "settings": args.setting,
        "notes": [
            "parts: the server's main thread ('server'), its other threads ('server threads'), and each child "
            "process of the server (the embedded redis-server, the WAL sync helper), from /proc/<pid>/task/<tid>/sched",
            "core_busy and cpu_us_per_pair: the sums over the parts; on the same core a pair's CPU rises as the rate "
            "falls (fewer requests per wake-up and per sync, colder caches)",
        ],
        "machine": machine(root, pinned),
        "command": " ".join(["python", "bench/rates.py", *sys.argv[1:]]),
    }


def print_table(out: dict[str, Any]) -> None:
    for phase in out["phases"]:
        print(
            f"{phase['rate_pairs_per_s']:>7g} pairs/s: reserve p50 {phase['reserve_p50_ms']} ms, "
            f"p99 {phase['reserve_p99_ms']} ms; core busy {phase['core_busy']}, {phase['cpu_us_per_pair']} µs per pair"
        )
        for name, part in phase["parts"].items():
            print(
                f"    {name:<24} {part['core_share']:>6.3f} core {part['cpu_us_per_pair']:>8.1f} µs/pair "
                f"{part['voluntary_switches_per_pair']:>6.2f} vol {part['involuntary_switches_per_pair']:>6.2f} invol"
            )


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"rates are numbers separated by commas, not {text!r}") from exc
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CPU per pair of tollway serve at fixed rates, per process and thread."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES), help="pairs per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="each phase (default 8)")
    parser.add_argument("--warmup", type=float, default=3.0, help="closed-loop warm-up (default 3)")
    add_setting_argument(parser)
    add_scratch_arguments(parser, "the scratch directory (data and server.log)")
    args = parser.parse_args(argv)
    args.setting = checked_settings(parser, args.setting)
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")
    if not sys.platform.startswith("linux"):
        parser.error("this benchmark reads /proc: Linux only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch_dir(args.data_dir, ".tollway-bench-rates-", args.keep) as root:
        out = measure(args, root)
    emit(out, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
