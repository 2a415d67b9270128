"""What a settled entry costs the engine, and what snapshots and recovery cost: ``python bench/capacity.py --json``.

For ``--entries`` N settled entries within the retention (a reserve and a commit each, with a
stored response of ``0`` and of ``--response-bytes`` bytes), it writes the WAL directly (no
service, no fsync: the log is the same bytes the engine writes), then, each in a fresh process:

- ``recover_from_log``: ``Engine.start`` folds the whole log (no snapshot yet);
- ``snapshot``: ``snapshot_now()`` time and the snapshot file's size (per entry too);
- ``recover_from_snapshot``: in another fresh process, ``Engine.start`` loads that snapshot
  (nothing to replay); the process's resident memory before and after it gives
  ``rss_per_entry_bytes`` (what the state keeps per settled entry, garbage collected, measured
  as RSS: allocator slack included). That process then takes a snapshot of what it recovered, as
  a running service takes its next one: ``peak_rss_during_snapshot_mb`` is its peak resident
  size while it does (the frozen copy of the table included), ``peak_rss_during_recovery_mb``
  the peak while it recovered.

``--redis-pairs`` P adds Redis memory per settled entry: a service with its embedded Redis
takes P reserve → commit pairs (a stored response of 0 and of ``--response-bytes`` bytes); the
projection's ``used_memory`` after it caught up, less before, over P.

``--growth`` N fills the settled-entry table alone (no engine) with N entries, as live work
does (each a request-key lookup, then the settlement of a new entry), and reports the slowest
of those N steps (``worst_step_ms``: the longest pause growing the indexes cost) and the CPU
per entry.

``--throughput`` adds reserve → commit pairs per second through ``Engine.execute`` (durability
``none``: the CPU of the command path only, 100 callers at a time). With ``--baseline-src DIR``
(a ``src`` directory of another commit, e.g. ``git archive <commit> src | tar -x -C DIR``) every
measurement also runs on that code, the two alternating, so "before" and "after" share the
machine's noise. Nothing is asserted; ``machine`` and ``loadavg`` in the JSON say how busy the
machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root instead of bench/, where
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # http.py would shadow the stdlib's http

from bench.machine import add_scratch_arguments, emit, loadavg, machine_facts, scratch_dir

BATCH_RECORDS = 2_000
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """The resident set size of this process."""
    return int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1]) * PAGE_BYTES


def peak_rss_bytes() -> int | None:
    """The peak resident set size of this process (``VmHWM``) since it started or :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current resident size (Linux: ``5`` to ``clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def write_log(wal_dir: Path, entries: int, response_bytes: int) -> int:
    """A WAL of one mint and ``entries`` settled entries (reserve, commit, stored response); its last sequence."""
    from tollway.core import events as ev  # noqa: PLC0415 - the measured code is imported by the children only
    from tollway.wal import codec  # noqa: PLC0415
    from tollway.wal.log import WalWriter  # noqa: PLC0415

    rate = ev.RateSnapshot(1000, 1_000_000, 0)
    response = '{"text":"' + "x" * max(0, response_bytes - 11) + '"}' if response_bytes else None
    wal_dir.mkdir(parents=True)
    writer = WalWriter(wal_dir, durable=False)
    records: list[bytes] = []
    seq, first, now = 0, 1, 1_767_225_600_000

    def add(entry_id: str, payload: ev.Payload) -> None:
        nonlocal seq
        seq += 1
        records.append(codec.encode(ev.Event(seq, now, entry_id, "bench", payload)))

    def flush() -> None:
        nonlocal first, records
        if records:
            writer.append(b"".join(records), first)
            first, records = seq + 1, []

    add("01KDVDNA000000000000000000", ev.CreditMint("acct", "fund", 10**15, None, 1_000_000, ""))
    for i in range(entries):
        entry_id = f"01KDVDNB{i:018d}"
        add(entry_id, ev.BillingReserve("acct", f"req-{i}", 10_000, now + 300_000, rate, "reserve:10000:"))
        add(entry_id, ev.BillingCommit("acct", 10_000, 7_000, 7_000, 0, "debit_available", False, rate))
        if response is not None:
            add(entry_id, ev.RequestComplete("acct", f"req-{i}", response))
        if len(records) >= BATCH_RECORDS:
            flush()
    flush()
    writer.close()
    return seq


async def measure(data_dir: Path) -> dict[str, Any]:
    """In a fresh process: recover from the log, snapshot, recover from the snapshot."""
    from tollway import Engine, Settings  # noqa: PLC0415
    from tollway.config import Durability  # noqa: PLC0415

    settings = Settings(data_dir=data_dir, durability=Durability.NONE, snapshot_every_events=10**12)
    started = time.perf_counter()
    engine = await Engine.start(settings)
    replay_s = time.perf_counter() - started
    whole = len(engine.state.entries)
    started = time.perf_counter()
    await engine.snapshot_now()
    snapshot_s = time.perf_counter() - started
    await engine.close()
    snapshot = max(settings.snapshot_dir.iterdir(), key=lambda path: path.name)
    return {
        "entries_kept_whole": whole,
        "recover_from_log_s": round(replay_s, 3),
        "snapshot_s": round(snapshot_s, 3),
        "snapshot_bytes": snapshot.stat().st_size,
    }


async def recover(data_dir: Path) -> dict[str, Any]:
    """In a fresh process: recover from the snapshot; the resident memory that added."""
    from tollway import Engine, Settings  # noqa: PLC0415
    from tollway.config import Durability  # noqa: PLC0415

    settings = Settings(data_dir=data_dir, durability=Durability.NONE, snapshot_every_events=10**12)
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    engine = await Engine.start(settings)
    from_snapshot_s = time.perf_counter() - started
    recovery_peak = peak_rss_bytes()
    gc.collect()
    after = rss_bytes()  # held by the state recovered from the snapshot (no stale expiry index of a replay)
    reset_peak_rss()
    started = time.perf_counter()
    await engine.snapshot_now()  # from the recovered state, as a running service takes its next one
    again_s = time.perf_counter() - started
    snapshot_peak = peak_rss_bytes()
    await engine.close()
    return {
        "rss_delta_bytes": after - before,
        "rss_after_recovery_mb": round(after / 1e6, 1),
        "recover_from_snapshot_s": round(from_snapshot_s, 3),
        "peak_rss_during_recovery_mb": None if recovery_peak is None else round(recovery_peak / 1e6, 1),
        "snapshot_after_recovery_s": round(again_s, 3),
        "peak_rss_during_snapshot_mb": None if snapshot_peak is None else round(snapshot_peak / 1e6, 1),
    }


async def throughput(data_dir: Path, pairs: int) -> dict[str, Any]:
    """Reserve → commit pairs per second through Engine.execute, 100 callers at a time, durability none."""
    from tollway import Engine, Settings  # noqa: PLC0415
    from tollway.config import Durability  # noqa: PLC0415
    from tollway.core import commands as cmd  # noqa: PLC0415

    settings = Settings(data_dir=data_dir, durability=Durability.NONE, snapshot_every_events=10**12)
    async with Engine.open(settings=settings) as engine:
        await engine.execute(cmd.Credit("acct", "fund", cmd.CreditKind.MINT, 10**15))

        async def pair(i: int) -> None:
            held = await engine.execute(cmd.Reserve("acct", f"r{i}", 10_000))
            assert isinstance(held, cmd.EntryResult), held
            await engine.execute(cmd.Commit(held.entry.billing_entry_id, 7_000, '{"ok":true}'))

        started, cpu_started = time.perf_counter(), time.process_time()
        for first in range(0, pairs, 100):
            await asyncio.gather(*(pair(i) for i in range(first, min(pairs, first + 100))))
        elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return {"pairs": pairs, "pairs_per_s": round(pairs / elapsed), "cpu_us_per_pair": round(cpu_s / pairs * 1e6, 1)}


async def redis_per_entry(data_dir: Path, pairs: int, response_bytes: int) -> dict[str, Any]:
    """Redis memory a settled entry leaves behind: a service, ``pairs`` reserve → commit pairs, used_memory."""
    from tollway import Settings  # noqa: PLC0415
    from tollway.config import Durability  # noqa: PLC0415
    from tollway.core import commands as cmd  # noqa: PLC0415
    from tollway.service import Service  # noqa: PLC0415

    response = '{"text":"' + "x" * max(0, response_bytes - 11) + '"}' if response_bytes else None
    settings = Settings(data_dir=data_dir, durability=Durability.NONE)
    async with Service.running(settings) as service:
        engine = service.engine
        await engine.execute(cmd.Credit("acct", "fund", cmd.CreditKind.MINT, 10**15))

        async def caught_up() -> int:
            while service.projector.applied_seq != engine.durable_sequence:  # noqa: ASYNC110 - owned by the projector
                await asyncio.sleep(0.05)
            return int((await service.redis.info("memory"))["used_memory"])

        before = await caught_up()

        async def pair(i: int) -> None:
            held = await engine.execute(cmd.Reserve("acct", f"r{i}", 10_000))
            assert isinstance(held, cmd.EntryResult), held
            await engine.execute(cmd.Commit(held.entry.billing_entry_id, 7_000, response))

        for first in range(0, pairs, 100):
            await asyncio.gather(*(pair(i) for i in range(first, min(pairs, first + 100))))
        after = await caught_up()
    return {
        "pairs": pairs,
        "redis_used_memory_delta_bytes": after - before,
        "per_entry_bytes": (after - before) / pairs,
    }


def growth(entries: int) -> dict[str, Any]:
    """The table alone filled with ``entries`` entries, one lookup and one settlement each: the slowest step."""
    import random  # noqa: PLC0415

    from tollway.core.ids import encode_ulid  # noqa: PLC0415
    from tollway.core.lifecycle import EntryState  # noqa: PLC0415
    from tollway.core.settled import SettledTable  # noqa: PLC0415

    table, rng, worst, worst_at = SettledTable(), random.Random(7), 0.0, 0
    started_ms = 1_700_000_000_000
    cpu_started = time.process_time()
    for i in range(entries):
        entry_id = encode_ulid((started_ms + i // 10) << 80 | rng.getrandbits(80))  # ten per millisecond
        step = time.perf_counter()
        table.by_request("acct", f"r{i}")
        table.add(entry_id, "acct", f"r{i}", state=EntryState.COMMITTED, charged_micro=7, updated_at_ms=i, seqs=(i,))
        took = time.perf_counter() - step
        if took > worst:
            worst, worst_at = took, i
    cpu_s = time.process_time() - cpu_started
    return {
        "entries": entries,
        "worst_step_ms": round(worst * 1e3, 2),
        "worst_step_at_entry": worst_at,
        "cpu_us_per_entry": round(cpu_s / entries * 1e6, 2),
    }


def child(args: argparse.Namespace) -> int:
    """One measurement in this (fresh) process; prints its JSON."""
    data_dir = Path(args.data_dir_child)
    if args.phase == "memory":
        result = asyncio.run(measure(data_dir))
    elif args.phase == "recover":
        result = asyncio.run(recover(data_dir))
    elif args.phase == "growth":
        result = growth(args.pairs)
    elif args.phase.startswith("redis-"):
        result = asyncio.run(redis_per_entry(data_dir, args.pairs, int(args.phase.removeprefix("redis-"))))
    else:
        result = asyncio.run(throughput(data_dir, args.pairs))
    print(json.dumps(result))
    return 0


def run_child(src: Path | None, phase: str, data_dir: Path, pairs: int = 0) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter on ``src`` (None: this checkout's code)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    command = [sys.executable, __file__, "--child", phase, "--data-dir-child", str(data_dir), "--pairs", str(pairs)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def per_entry(result: dict[str, Any], entries: int) -> dict[str, Any]:
    """The figures of one memory run with their per-entry forms."""
    return result | {
        "rss_per_entry_bytes": round(result["rss_delta_bytes"] / entries, 1),
        "snapshot_per_entry_bytes": round(result["snapshot_bytes"] / entries, 1),
    }


def run(scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, alternating the code versions."""
    versions: dict[str, Path | None] = {"this": None}
    if args.baseline_src is not None:
        versions = {"baseline": Path(args.baseline_src).resolve(), "this": None}
    memory: dict[str, dict[str, Any]] = {name: {} for name in versions}
    for response_bytes in sorted({0, args.response_bytes}):
        log_dir = scratch / f"log-{response_bytes}"
        write_log(log_dir / "wal", args.entries, response_bytes)
        for name, src in versions.items():
            data_dir = scratch / f"{name}-{response_bytes}"
            subprocess.run(["cp", "-r", str(log_dir), str(data_dir)], check=True)
            result = run_child(src, "memory", data_dir) | run_child(src, "recover", data_dir)
            memory[name][f"response_{response_bytes}_bytes"] = per_entry(result, args.entries)
            subprocess.run(["rm", "-rf", str(data_dir)], check=True)
        subprocess.run(["rm", "-rf", str(log_dir)], check=True)
    redis: dict[str, dict[str, Any]] = {name: {} for name in versions}
    for response_bytes in sorted({0, args.response_bytes}) if args.redis_pairs else []:
        for name, src in versions.items():
            data_dir = scratch / f"redis-{name}-{response_bytes}"
            result = run_child(src, f"redis-{response_bytes}", data_dir, args.redis_pairs)
            redis[name][f"response_{response_bytes}_bytes"] = result
            subprocess.run(["rm", "-rf", str(data_dir)], check=True)
    grown = {name: run_child(src, "growth", scratch, args.growth) for name, src in versions.items() if args.growth}
    rates: dict[str, list[int]] = {name: [] for name in versions}
    cpu: dict[str, list[float]] = {name: [] for name in versions}
    for round_ in range(args.throughput_rounds if args.throughput else 0):
        for name, src in versions.items():
            data_dir = scratch / f"tp-{name}-{round_}"
            result = run_child(src, "throughput", data_dir, args.throughput)
            rates[name].append(result["pairs_per_s"])
            cpu[name].append(result["cpu_us_per_pair"])
            subprocess.run(["rm", "-rf", str(data_dir)], check=True)
    return {
        "entries": args.entries,
        "response_bytes": args.response_bytes,
        "memory": memory,
        "redis": redis,
        "growth": grown,
        "throughput_pairs_per_s": rates,
        "cpu_us_per_pair": cpu,
        "machine": machine_facts(scratch) | {"loadavg": loadavg()},
        "command": " ".join(["python", *sys.argv]),
        "notes": [
            "each entry: a reserve and a commit (COMMITTED, settled), with no stored response or one of response_bytes",
            "rss_per_entry_bytes: resident memory of a recovery from the snapshot over entries (allocator slack in)",
            "recover_from_log_s: a whole-log replay; recover_from_snapshot_s: the snapshot just written, no replay",
            "growth: the table alone filled with that many entries; worst_step_ms is the slowest lookup +"
            " settlement (a pause growing the indexes), cpu_us_per_entry includes making the ids",
            "throughput: reserve+commit pairs per second (wall) and CPU microseconds per pair (process time, less"
            " sensitive to a busy machine), durability none, runs alternating between versions",
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="settled entries (default 1,000,000)")
    parser.add_argument("--response-bytes", type=int, default=2_000, help="the stored response's size (default 2000)")
    parser.add_argument("--redis-pairs", type=int, default=0, help="pairs for Redis memory per entry (0: none)")
    parser.add_argument("--throughput", type=int, default=0, help="reserve+commit pairs per throughput run (0: none)")
    parser.add_argument("--growth", type=int, default=0, help="entries to fill the table alone with (0: none)")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="alternating throughput runs per version")
    parser.add_argument("--baseline-src", default=None, help="a src directory of the code to compare with")
    parser.add_argument("--quick", action="store_true", help="2,000 entries, 500 pairs, growth 5,000: a smoke test")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default: indented)")
    parser.add_argument("--child", dest="phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=0, help=argparse.SUPPRESS)
    add_scratch_arguments(parser)
    args = parser.parse_args()
    if args.phase is not None:
        return child(args)
    if args.quick:
        args.entries, args.throughput, args.throughput_rounds, args.redis_pairs = 2_000, 500, 1, 200
        args.growth = 5_000
    with scratch_dir(args.data_dir, "tollway-capacity-", args.keep) as scratch:
        result = run(scratch, args)
    emit(result, args.json, lambda out: print(json.dumps(out, indent=2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
