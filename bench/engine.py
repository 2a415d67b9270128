"""End-to-end benchmark of the tollway engine, measured against the disk it runs on.

``python bench/engine.py --json`` prints one JSON object; without ``--json`` a table. It measures:

- **load**: ``--concurrency`` asyncio callers doing reserve → commit pairs through
  :meth:`Engine.execute` against a funded set of accounts, ``durability=fsync``, default
  settings (so periodic snapshots happen during the load, as in production). Throughput counts
  the records of the group-commit batches that reached disk inside the measuring window (an
  observer counts ``wal_batch`` calls); latency is the reserve call as seen by its caller.
- **recovery**: a data directory holding ``--events-1m`` events (reserve/commit pairs plus the
  mints that fund them) is built quickly with ``durability=none`` — only the reopen is
  measured — with the default ``snapshot_every_events``. It is reopened three times: as the
  engine left it (clean shutdown: a snapshot at the last sequence), as after a crash (the
  snapshot taken at close removed, so the newest periodic snapshot plus the WAL after it is
  replayed: this is ``recovery_s_1m``), and with no snapshot at all (``replay_events_per_s``:
  the whole log replayed by ``Engine.open``).
- **ceiling**: on the same filesystem, in the same run: small ``os.write`` + ``fdatasync`` in a
  loop, and plain framed group-commit batches of 128 records without the engine.

Each engine phase runs in a fresh child process (this file with ``--phase``), so one phase's
heap and garbage-collector state never bleed into another's numbers. The page cache is warm
for the reopen phases (the files were just written). Nothing here is a hard-coded figure:
every number is measured by the run that prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

import tollway
from tollway import Commit, Credit, CreditKind, Durability, Engine, EntryResult, Reserve, Settings
from tollway.config import PumpMode, WalSyncer
from tollway.core import events as ev
from tollway.core.ids import UlidGenerator
from tollway.core.observer import NoopObserver
from tollway.redis.projector import Projector
from tollway.wal import codec
from tollway.wal.snapshot import list_snapshots

if __package__ in (None, ""):  # run as a script: make the repository root importable for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import add_scratch_arguments, emit, loadavg, machine_facts, scratch_dir, wakeup_latency
from bench.redis_projection import catch_up_s, evalsha_per_s, lag_report, projecting, redis_usage

TARGETS: Final[dict[str, float]] = {
    "events_per_s": 50_000,
    "reserve_p99_ms": 5,
    "replay_events_per_s": 250_000,
    "recovery_s_1m": 5,
}
REDIS_TARGETS: Final[dict[str, float]] = {"events_per_s": 30_000, "projection_lag_ms_max": 1_000}
"""With ``--redis`` (issue 3): end to end with the projection on, and the lag it may reach."""
PHASES: Final = ("ceiling", "load", "recovery")
CALLERS_RATIO_MAX: Final = 2.0
"""Issue 21's target: CPU per event with 16 concurrent callers within this factor of 128 callers'."""
FUNDING_MICRO: Final = 10**12  # per account: far more than any run can spend
ESTIMATE_MICRO: Final = 20_000
BUILD_CONCURRENCY: Final = 512
GROUP_COMMIT_RECORDS: Final = 128


class BenchError(RuntimeError):
    """The benchmark itself went wrong (a refusal, a child that failed): its numbers are void."""


# -- the observer ----------------------------------------------------------------------------


class CountingObserver(NoopObserver):
    """Counts group-commit batches, refusals and what recovery reported."""

    def __init__(self) -> None:
        self.batches = 0
        self.records = 0
        self.bytes = 0
        self.sync_seconds = 0.0
        self.sync_seconds_max = 0.0
        self.refusals: dict[str, int] = {}
        self.recovered_events = 0
        self.recovery_seconds = 0.0
        self.from_snapshot = 0

    def refused(self, command: str, code: str) -> None:
        """Count a refusal; the load must have none."""
        key = f"{command}:{code}"
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def wal_batch(self, records: int, size_bytes: int, sync_seconds: float) -> None:
        """Count one group-commit batch."""
        self.batches += 1
        self.records += records
        self.bytes += size_bytes
        self.sync_seconds += sync_seconds
        self.sync_seconds_max = max(self.sync_seconds_max, sync_seconds)

    def recovered(self, events: int, seconds: float, from_snapshot: int) -> None:
        """Remember what startup replayed."""
        self.recovered_events = events
        self.recovery_seconds = seconds
        self.from_snapshot = from_snapshot

    def counters(self) -> tuple[int, int, int, float]:
        """(batches, records, bytes, sync seconds) so far."""
        return self.batches, self.records, self.bytes, self.sync_seconds


# -- small helpers ---------------------------------------------------------------------------


def percentile_us(samples_ns: list[int], pct: float) -> float | None:
    """Nearest-rank percentile of nanosecond samples, in microseconds."""
    if not samples_ns:
        return None
    ordered = sorted(samples_ns)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1] / 1000, 1)


def account_names(count: int) -> list[str]:
    return [f"acct-{index:06d}" for index in range(count)]


async def fund(engine: Engine, accounts: list[str]) -> None:
    """Mint ``FUNDING_MICRO`` into every account (setup; not measured)."""
    results = await asyncio.gather(
        *(engine.execute(Credit(name, f"fund-{name}", CreditKind.MINT, FUNDING_MICRO)) for name in accounts)
    )
    refused = [result for result in results if isinstance(result, tollway.Refusal)]
    if refused:
        raise BenchError(f"funding refused: {refused[0]}")


async def reserve_commit(engine: Engine, account: str, request_id: str, actual_micro: int) -> int:
    """One pair; returns the reserve latency in ns. Any refusal voids the run."""
    started = time.perf_counter_ns()
    held = await engine.execute(Reserve(account, request_id, ESTIMATE_MICRO))
    reserve_ns = time.perf_counter_ns() - started
    if not isinstance(held, EntryResult):
        raise BenchError(f"reserve refused: {held}")
    done = await engine.execute(Commit(held.entry.billing_entry_id, actual_micro))
    if not isinstance(done, EntryResult):
        raise BenchError(f"commit refused: {done}")
    return reserve_ns


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- ceiling: what the disk allows, without the engine ---------------------------------------


def sample_event() -> ev.Event:
    """A realistic reserve event, as the load writes them."""
    now_ms = time.time_ns() // 1_000_000
    entry_id = UlidGenerator(lambda: now_ms, lambda: random.getrandbits(80)).new()
    payload = ev.BillingReserve(
        "acct-000123",
        "w17-000042",
        ESTIMATE_MICRO,
        now_ms + 300_000,
        ev.RateSnapshot(100, 1_000_000, now_ms),
        f"reserve:{ESTIMATE_MICRO}:",
    )
    return ev.Event(123_456, now_ms, entry_id, "untraced", payload)


def timed_appends(path: Path, seconds: float, make: Callable[[], bytes]) -> tuple[int, float, list[int], float]:
    """Append ``make()`` and ``fdatasync`` in a loop: (appends, elapsed seconds, ns per append, CPU seconds)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    latencies: list[int] = []
    cpu_started = time.thread_time()
    try:
        started = time.perf_counter_ns()
        deadline = started + int(seconds * 1e9)
        now = started
        while now < deadline or not latencies:
            write_all(fd, make())
            os.fdatasync(fd)
            latencies.append(time.perf_counter_ns() - now)
            now = time.perf_counter_ns()
    finally:
        os.close(fd)
    return len(latencies), (now - started) / 1e9, latencies, time.thread_time() - cpu_started


def run_ceiling(directory: Path, seconds: float) -> dict[str, Any]:
    """What the disk allows without the engine: single-record syncs and plain framed group commits."""
    directory.mkdir(parents=True, exist_ok=True)
    body = codec.encode_body(sample_event())
    small = b"x" * 64
    syncs, sync_s, sync_ns, sync_cpu_s = timed_appends(directory / "fsync-probe", seconds, lambda: small)
    batches, batch_s, batch_ns, _ = timed_appends(
        directory / "group-probe", seconds, lambda: b"".join([codec.frame(body) for _ in range(GROUP_COMMIT_RECORDS)])
    )
    return {
        "fsync_per_s": round(syncs / sync_s),
        "fsync_p50_us": percentile_us(sync_ns, 50),
        "fsync_p99_us": percentile_us(sync_ns, 99),
        "fsync_max_us": percentile_us(sync_ns, 100),
        "fsync_cpu_us": round(sync_cpu_s / syncs * 1e6, 1),
        "group_commit_records_per_s": round(batches * GROUP_COMMIT_RECORDS / batch_s),
        "group_commit_batch": GROUP_COMMIT_RECORDS,
        "group_commit_p99_us": percentile_us(batch_ns, 99),
        "record_bytes": len(codec.frame(body)),
        "seconds_each": seconds,
    } | wakeup_latency(seconds)


# -- load: concurrent reserve → commit pairs, durability fsync -------------------------------


@dataclass
class LoadWindow:
    """What the callers saw while the measuring window was open."""

    measuring: bool = False
    stop: bool = False
    pairs: int = 0
    reserve_ns: list[int] = field(default_factory=list)
    pair_ns: list[int] = field(default_factory=list)
    loop_lag_ns: list[int] = field(default_factory=list)


async def load_worker(engine: Engine, worker: int, accounts: list[str], window: LoadWindow) -> None:
    rng = random.Random(worker)
    index = 0
    while not window.stop:
        measured = window.measuring
        started = time.perf_counter_ns()
        reserve_ns = await reserve_commit(
            engine, rng.choice(accounts), f"w{worker}-{index}", rng.randrange(1_000, ESTIMATE_MICRO + 1)
        )
        index += 1
        if measured:
            window.reserve_ns.append(reserve_ns)
        if window.measuring:
            window.pairs += 1
            window.pair_ns.append(time.perf_counter_ns() - started)


@dataclass(frozen=True)
class LoadPlan:
    """How the load phase runs."""

    seconds: float
    warmup_s: float
    concurrency: int
    accounts: int
    durability: Durability
    redis: bool = False  # project into a private redis-server while loading
    wal_syncer: WalSyncer = WalSyncer.PROCESS
    projection_pump: PumpMode = PumpMode.AUTO


class GcPauses:
    """Pauses of the cyclic garbage collector, by generation, while ``active`` (via ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.active = False
        self.count = [0, 0, 0]
        self.total_ns = [0, 0, 0]
        self.max_ns = [0, 0, 0]
        self._started_ns = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        """Time one collection (called by the collector before and after it)."""
        if phase == "start":
            self._started_ns = time.perf_counter_ns()
            return
        if self.active:
            pause_ns, generation = time.perf_counter_ns() - self._started_ns, info["generation"]
            self.count[generation] += 1
            self.total_ns[generation] += pause_ns
            self.max_ns[generation] = max(self.max_ns[generation], pause_ns)

    def report(self, elapsed_s: float) -> dict[str, Any]:
        """Counts, total and longest pause per generation, and the share of the window spent collecting."""
        return {
            "collections": self.count,
            "pause_ms_total": [round(ns / 1e6, 1) for ns in self.total_ns],
            "pause_ms_max": [round(ns / 1e6, 1) for ns in self.max_ns],
            "share_of_window": round(sum(self.total_ns) / 1e9 / elapsed_s, 4),
        }


async def watch_loop(window: LoadWindow, interval_s: float = 0.002) -> None:
    """Record how late the event loop wakes a sleeper: its stalls (snapshots, GC, long callbacks)."""
    interval_ns = int(interval_s * 1e9)
    while not window.stop:
        started = time.perf_counter_ns()
        await asyncio.sleep(interval_s)
        if window.measuring:
            window.loop_lag_ns.append(max(0, time.perf_counter_ns() - started - interval_ns))


@dataclass
class Counters:
    """Cumulative counters read at the start and at the end of the measuring window."""

    batches: int
    records: int
    bytes: int
    sync_s: float
    wall_s: float
    process_cpu_s: float
    loop_cpu_s: float
    machine: tuple[int, int]  # (busy, all) clock ticks of every CPU, from /proc/stat

    @classmethod
    def read(cls, observer: CountingObserver) -> Counters:
        """The counters now."""
        return cls(*observer.counters(), time.perf_counter(), time.process_time(), time.thread_time(), machine_ticks())


def machine_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of all CPUs since boot (Linux ``/proc/stat``; zeros elsewhere)."""
    try:
        ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


async def run_load(data_dir: Path, plan: LoadPlan) -> dict[str, Any]:
    observer, pauses, window = CountingObserver(), GcPauses(), LoadWindow()
    settings = Settings(
        data_dir=data_dir, durability=plan.durability, wal_syncer=plan.wal_syncer, projection_pump=plan.projection_pump
    )
    names = account_names(plan.accounts)
    gc.callbacks.append(pauses)
    try:
        async with Engine.open(settings=settings, observer=observer) as engine, contextlib.AsyncExitStack() as stack:
            projection = await stack.enter_async_context(projecting(engine, data_dir / "redis")) if plan.redis else None
            await fund(engine, names)
            memory_at_start = await memory_usage(engine, projection[0] if projection else None)
            tasks = [asyncio.create_task(load_worker(engine, w, names, window)) for w in range(plan.concurrency)]
            tasks.append(asyncio.create_task(watch_loop(window)))
            await asyncio.sleep(plan.warmup_s)
            before = Counters.read(observer)
            window.measuring = pauses.active = True
            if projection:
                projection[1].measuring, projection[1].applied_at_start = True, projection[0].applied_seq or 0
                projection[1].redis_at_start = await redis_usage(projection[0].redis)
            observer.sync_seconds_max = 0.0
            await asyncio.sleep(plan.seconds)
            window.measuring = pauses.active = False
            after, sync_max_s = Counters.read(observer), observer.sync_seconds_max
            extra: dict[str, Any] = {}
            if projection:
                projection[1].measuring, projection[1].applied_at_end = False, projection[0].applied_seq or 0
                projection[1].redis_at_end = await redis_usage(projection[0].redis)
            window.stop = True
            await asyncio.gather(*tasks)
            if projection:
                extra = lag_report(projection[1], after.wall_s - before.wall_s, await catch_up_s(projection[0], engine))
            extra["memory"] = memory_report(
                memory_at_start, await memory_usage(engine, projection[0] if projection else None)
            )
    finally:
        gc.callbacks.remove(pauses)
    if observer.refusals:
        raise BenchError(f"refusals during the load: {observer.refusals}")
    return (
        load_report(plan, window, before, after)
        | extra
        | {
            "batch_sync_ms_max": round(sync_max_s * 1000, 3),
            "gc": pauses.report(after.wall_s - before.wall_s),
        }
    )


def resident_bytes() -> int:
    """Resident memory of the running process (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def memory_usage(engine: Engine, projector: Projector | None) -> tuple[int, int, int | None]:
    """Entries in the engine's state, this process's resident memory, and Redis's ``used_memory`` (bytes)."""
    resident = resident_bytes()
    used = None if projector is None else int((await projector.redis.info("memory"))["used_memory"])
    return len(engine.state.entries), resident, used


def memory_report(start: tuple[int, int, int | None], end: tuple[int, int, int | None]) -> dict[str, Any]:
    """What each entry the load created costs in memory: this process, and the Redis projection."""
    entries = end[0] - start[0]
    if entries <= 0:
        return {"entries_created": entries}
    redis_bytes = None if start[2] is None or end[2] is None else round((end[2] - start[2]) / entries)
    return {
        "entries_created": entries,
        "rss_growth_bytes_per_entry": round((end[1] - start[1]) / entries),
        "redis_bytes_per_entry": redis_bytes,
    }


def load_report(plan: LoadPlan, window: LoadWindow, before: Counters, after: Counters) -> dict[str, Any]:
    elapsed = after.wall_s - before.wall_s
    batches, records = after.batches - before.batches, after.records - before.records

    def per_event_us(total_s: float) -> float | None:
        return round(total_s / records * 1e6, 2) if records else None

    return {
        "events_per_s": round(records / elapsed),
        "pairs_per_s": round(window.pairs / elapsed),
        "reserve_p50_us": percentile_us(window.reserve_ns, 50),
        "reserve_p99_us": percentile_us(window.reserve_ns, 99),
        "reserve_max_us": percentile_us(window.reserve_ns, 100),
        "pair_p50_us": percentile_us(window.pair_ns, 50),
        "pair_p99_us": percentile_us(window.pair_ns, 99),
        "batch_avg": round(records / batches, 1) if batches else None,
        "batches": batches,
        "batch_sync_ms_avg": round((after.sync_s - before.sync_s) / batches * 1000, 3) if batches else None,
        "loop_cpu_us_per_event": per_event_us(after.loop_cpu_s - before.loop_cpu_s),
        "process_cpu_us_per_event": per_event_us(after.process_cpu_s - before.process_cpu_s),
        "loop_busy": round((after.loop_cpu_s - before.loop_cpu_s) / elapsed, 3),
        "machine_cpus_busy": machine_busy(before.machine, after.machine),
        "loop_lag_p99_ms": ms(percentile_us(window.loop_lag_ns, 99)),
        "loop_lag_max_ms": ms(percentile_us(window.loop_lag_ns, 100)),
        "wal_bytes_per_event": round((after.bytes - before.bytes) / records, 1) if records else None,
        "events": records,
        "pairs": window.pairs,
        "window_s": round(elapsed, 3),
        "warmup_s": plan.warmup_s,
        "concurrency": plan.concurrency,
        "accounts": plan.accounts,
        "durability": plan.durability.value,
        "wal_syncer": plan.wal_syncer.value,
        "projection_pump": Settings(projection_pump=plan.projection_pump).uses_pump if plan.redis else None,
    }


def machine_busy(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """CPUs busy on average over the window, all processes (2.0: both cores of a 2-core machine full)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(busy / total * (os.cpu_count() or 1), 2) if total else None


def ms(value_us: float | None) -> float | None:
    return None if value_us is None else round(value_us / 1000, 2)


# -- recovery: build a big data dir fast, then time reopening it -----------------------------


def build_plan(events: int, accounts: int) -> tuple[int, int]:
    """(accounts, pairs) so that mints + 2 × pairs is exactly ``events``."""
    if events < 10:
        raise BenchError("--events-1m must be at least 10")
    funded = max(2, min(accounts, events // 4))
    if (events - funded) % 2:
        funded -= 1
    return funded, (events - funded) // 2


async def run_build(data_dir: Path, events: int, accounts: int) -> dict[str, Any]:
    """Write ``events`` events through the engine with ``durability=none`` and default snapshots."""
    funded, pairs = build_plan(events, accounts)
    names = account_names(funded)
    settings = Settings(data_dir=data_dir, durability=Durability.NONE)
    started = time.perf_counter()
    async with Engine.open(settings=settings) as engine:
        await fund(engine, names)
        taken = iter(range(pairs))

        async def worker(number: int) -> None:
            rng = random.Random(number)
            for index in taken:
                await reserve_commit(engine, names[index % funded], f"b-{index}", rng.randrange(1_000, ESTIMATE_MICRO))

        await asyncio.gather(*(worker(number) for number in range(BUILD_CONCURRENCY)))
        written = engine.state.last_sequence
    if written != events:
        raise BenchError(f"built {written} events, wanted {events}")
    return {
        "events": written,
        "build_s": round(time.perf_counter() - started, 2),
        "snapshots": [snapshot_sequence(path) for path in list_snapshots(settings.snapshot_dir)],
    }


def snapshot_sequence(path: Path) -> int:
    return int(path.name.removeprefix("snapshot-").removesuffix(".snap"))


async def run_open(data_dir: Path) -> dict[str, Any]:
    """Time ``Engine.open`` on ``data_dir`` with production settings (durability fsync)."""
    observer = CountingObserver()
    settings = Settings(data_dir=data_dir)
    started = time.perf_counter()
    async with Engine.open(settings=settings, observer=observer) as engine:
        opened = time.perf_counter() - started
        last = engine.state.last_sequence
    return {
        "open_s": round(opened, 3),
        "recover_s": round(observer.recovery_seconds, 3),
        "replayed_events": observer.recovered_events,
        "from_snapshot": observer.from_snapshot,
        "last_sequence": last,
    }


def drop_close_snapshot(snapshot_dir: Path, last_sequence: int) -> None:
    """Remove the snapshot ``close()`` wrote at the last sequence, as if the process had crashed."""
    snapshots = list_snapshots(snapshot_dir)
    if len(snapshots) > 1 and snapshot_sequence(snapshots[-1]) == last_sequence:
        snapshots[-1].unlink()


def drop_all_snapshots(snapshot_dir: Path) -> None:
    for path in snapshot_dir.iterdir():
        path.unlink()


# -- child processes -------------------------------------------------------------------------


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Body of a child process: one engine phase."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data_dir = Path(args.phase_dir)
    if args.phase == "load":
        plan = LoadPlan(
            args.seconds,
            args.warmup,
            args.concurrency,
            args.accounts,
            Durability(args.durability),
            args.redis,
            WalSyncer(args.wal_syncer),
            PumpMode.OFF if args.no_pump else PumpMode.AUTO,
        )
        return asyncio.run(run_load(data_dir, plan))
    if args.phase == "build":
        return asyncio.run(run_build(data_dir, args.events_1m, args.accounts))
    if args.phase == "open":
        return asyncio.run(run_open(data_dir))
    raise BenchError(f"unknown phase {args.phase}")


def child(phase: str, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one phase in a fresh interpreter and return its JSON result."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--phase",
        phase,
        "--phase-dir",
        str(data_dir),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--concurrency",
        str(args.concurrency),
        "--accounts",
        str(args.accounts),
        "--events-1m",
        str(args.events_1m),
        "--durability",
        args.durability,
        "--wal-syncer",
        args.wal_syncer,
        *(["--redis"] if args.redis else []),
        *(["--no-pump"] if args.no_pump else []),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"phase {phase} failed with exit status {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the run ---------------------------------------------------------------------------------


def measure_recovery(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    data_dir = root / "recovery"
    built = child("build", data_dir, args)
    clean = child("open", data_dir, args)
    drop_close_snapshot(Settings(data_dir=data_dir).snapshot_dir, built["events"])
    crash = child("open", data_dir, args)
    drop_all_snapshots(Settings(data_dir=data_dir).snapshot_dir)
    replay = child("open", data_dir, args)
    if not args.keep:
        shutil.rmtree(data_dir)
    return {
        "events": built["events"],
        "built_with": "durability=none (only the reopen is measured)",
        "build_s": built["build_s"],
        "snapshot_every_events": Settings().snapshot_every_events,
        "snapshots_after_build": built["snapshots"],
        "clean_shutdown": clean,
        "after_crash": crash,
        "no_snapshot": replay,
        "replay_events_per_s": round(replay["replayed_events"] / replay["open_s"]) if replay["open_s"] else None,
    }


def run_all(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"loadavg_before": loadavg(), "started": time.perf_counter()}
    if "ceiling" in args.only:
        result["ceiling"] = run_ceiling(root / "ceiling", args.ceiling_seconds)
        if args.redis:
            result["ceiling"] |= evalsha_per_s(root / "ceiling-redis", args.ceiling_seconds)
        if not args.keep:
            shutil.rmtree(root / "ceiling")
    if "load" in args.only:
        result["load"] = child("load", root / "load", args)
        if not args.keep:
            shutil.rmtree(root / "load")
    if "recovery" in args.only:
        result["recovery"] = measure_recovery(root, args)
    if args.callers:
        result["callers"] = [callers_point(root, args, count) for count in args.callers]
    result["run_s"] = round(time.perf_counter() - result.pop("started"), 1)
    return result


def callers_point(root: Path, args: argparse.Namespace, count: int) -> dict[str, Any]:
    """One load phase with ``count`` concurrent callers: its rate and CPU per event."""
    data_dir = root / f"callers-{count}"
    load = child("load", data_dir, argparse.Namespace(**{**vars(args), "concurrency": count}))
    if not args.keep:
        shutil.rmtree(data_dir)
    keys = ("events_per_s", "batch_avg", "process_cpu_us_per_event", "loop_cpu_us_per_event", "reserve_p50_us")
    return {"concurrency": count} | {key: load.get(key) for key in (*keys, "reserve_p99_us", "machine_cpus_busy")}


def callers_ratio(points: list[dict[str, Any]], few: int = 16, many: int = 128) -> float | None:
    """Process CPU per event with ``few`` callers over that with ``many`` (None unless both ran)."""
    cpu = {point["concurrency"]: point.get("process_cpu_us_per_event") for point in points}
    low, high = cpu.get(few), cpu.get(many)
    return round(low / high, 3) if low and high else None


def summary(args: argparse.Namespace, measured: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    load = measured.get("load", {})
    recovery = measured.get("recovery", {})
    out: dict[str, Any] = {
        "events_per_s": load.get("events_per_s"),
        "pairs_per_s": load.get("pairs_per_s"),
        "reserve_p50_us": load.get("reserve_p50_us"),
        "reserve_p99_us": load.get("reserve_p99_us"),
        "batch_avg": load.get("batch_avg"),
        "durability": args.durability,
        "wal_syncer": args.wal_syncer,
        "replay_events_per_s": recovery.get("replay_events_per_s"),
        **(
            {
                "projection_lag_ms_max": load.get("projection_lag_ms_max"),
                "projected_events_per_s": load.get("projected_events_per_s"),
            }
            if args.redis
            else {}
        ),
        "recovery_s_1m": recovery.get("after_crash", {}).get("open_s"),
        "callers": measured.get("callers"),
        "callers_cpu_ratio_16_over_128": callers_ratio(measured.get("callers") or []),
        "recovery_s_1m_clean_shutdown": recovery.get("clean_shutdown", {}).get("open_s"),
        "recovery_events": recovery.get("events"),
        "ceiling": measured.get("ceiling"),
        "targets": TARGETS
        | (REDIS_TARGETS if args.redis else {})
        | ({"callers_cpu_ratio_16_over_128_max": CALLERS_RATIO_MAX} if args.callers else {}),
        "meets_targets": meets_targets(load if args.durability == "fsync" else {}, recovery, args.redis)
        | _callers_verdict(measured.get("callers"), args.callers),
        "load": load or None,
        "recovery": recovery or None,
        "machine": machine(data_dir)
        | {"loadavg_before": measured["loadavg_before"], "loadavg_after": loadavg(), "run_s": measured["run_s"]},
        "command": shlex.join(sys.orig_argv),
        "options": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "accounts": args.accounts,
            "events_1m": args.events_1m,
            "quick": args.quick,
            "only": sorted(args.only),
            "callers": args.callers,
        },
        "notes": NOTES,
    }
    return out


NOTES: Final = [
    "recovery_s_1m: Engine.open of a directory built with durability=none (only the reopen is measured), "
    "after removing the snapshot close() wrote, so the newest periodic snapshot plus the WAL after it is replayed",
    "replay_events_per_s: the same directory with every snapshot removed; events from the observer's recovered()",
    "reopen phases run with a warm page cache; each engine phase runs in a fresh child process",
    "events_per_s counts records of group-commit batches that reached disk inside the measuring window",
]


def meets_targets(load: dict[str, Any], recovery: dict[str, Any], redis: bool = False) -> dict[str, bool | None]:
    def check(value: float | None, ok: bool) -> bool | None:
        return None if value is None else ok

    targets = TARGETS | (REDIS_TARGETS if redis else {})
    events = load.get("events_per_s")
    p99 = load.get("reserve_p99_us")
    replay = recovery.get("replay_events_per_s")
    crash = recovery.get("after_crash", {}).get("open_s")
    lag = load.get("projection_lag_ms_max")
    extra = {"projection_lag_ms_max": check(lag, lag is not None and lag <= targets["projection_lag_ms_max"])}
    return (extra if redis else {}) | {
        "events_per_s": check(events, events is not None and events >= targets["events_per_s"]),
        "reserve_p99_ms": check(p99, p99 is not None and p99 / 1000 <= TARGETS["reserve_p99_ms"]),
        "replay_events_per_s": check(replay, replay is not None and replay >= TARGETS["replay_events_per_s"]),
        "recovery_s_1m": check(crash, crash is not None and crash <= TARGETS["recovery_s_1m"]),
    }


def _callers_verdict(points: list[dict[str, Any]] | None, asked: list[int] | None) -> dict[str, bool | None]:
    if not asked:
        return {}
    ratio = callers_ratio(points or [])
    return {"callers_cpu_ratio_16_over_128_max": None if ratio is None else ratio <= CALLERS_RATIO_MAX}


def machine(data_dir: Path) -> dict[str, Any]:
    return machine_facts(data_dir) | {
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python_implementation": platform.python_implementation(),
        "msgspec": msgspec.__version__,
        "tollway": tollway_version(),
    }


def tollway_version() -> str | None:
    with contextlib.suppress(Exception):
        from importlib.metadata import version  # noqa: PLC0415 - only the report needs it

        return version("tollway")
    return None


# -- output ----------------------------------------------------------------------------------


def table_rows(out: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    met = out["meets_targets"]
    p99 = out["reserve_p99_us"]
    yield (f"events_per_s ({out['durability']})", fmt(out["events_per_s"]), ">= 50000", verdict(met["events_per_s"]))
    yield ("pairs_per_s", fmt(out["pairs_per_s"]), "", "")
    yield (
        "reserve p50 / p99 (ms)",
        f"{fmt_ms(out['reserve_p50_us'])} / {fmt_ms(p99)}",
        "p99 <= 5",
        verdict(met["reserve_p99_ms"]),
    )
    yield ("batch_avg (records)", fmt(out["batch_avg"]), "", "")
    load = out["load"] or {}
    yield ("loop CPU per event (us)", fmt(load.get("loop_cpu_us_per_event")), "", "")
    yield ("loop stall max (ms)", fmt(load.get("loop_lag_max_ms")), "", "")
    memory = load.get("memory") or {}
    yield ("memory per entry: RSS growth (bytes)", fmt(memory.get("rss_growth_bytes_per_entry")), "", "")
    yield ("memory per entry: Redis (bytes)", fmt(memory.get("redis_bytes_per_entry")), "", "")
    yield ("replay_events_per_s", fmt(out["replay_events_per_s"]), ">= 250000", verdict(met["replay_events_per_s"]))
    events = fmt(out["recovery_events"])
    yield (f"recovery_s ({events} events)", fmt(out["recovery_s_1m"]), "<= 5", verdict(met["recovery_s_1m"]))
    yield ("  after clean shutdown (s)", fmt(out["recovery_s_1m_clean_shutdown"]), "", "")
    ceiling = out["ceiling"] or {}
    yield ("ceiling: fsync_per_s", fmt(ceiling.get("fsync_per_s")), "", "")
    yield (
        "ceiling: fsync p50 / p99 (ms)",
        f"{fmt_ms(ceiling.get('fsync_p50_us'))} / {fmt_ms(ceiling.get('fsync_p99_us'))}",
        "",
        "",
    )
    yield ("ceiling: group_commit_records_per_s", fmt(ceiling.get("group_commit_records_per_s")), "", "")
    yield ("ceiling: wake-up late p99 (ms)", fmt(ceiling.get("wakeup_p99_ms")), "", "")
    for point in out["callers"] or []:
        label = f"callers {point['concurrency']}: CPU per event (us), events/s"
        yield (label, f"{fmt(point['process_cpu_us_per_event'])}, {fmt(point['events_per_s'])}", "", "")
    if out["callers"]:
        verdict_16 = verdict(met.get("callers_cpu_ratio_16_over_128_max"))
        yield ("callers: CPU per event 16 / 128", fmt(out["callers_cpu_ratio_16_over_128"]), "<= 2", verdict_16)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_ms(value_us: float | None) -> str:
    return "-" if value_us is None else f"{value_us / 1000:.2f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("ok" if ok else "MISS")


def print_table(out: dict[str, Any]) -> None:
    rows = list(table_rows(out))
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':<{width}}  {'value':>14}  {'target':>10}  met")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>14}  {target:>10}  {ok}")
    facts = out["machine"]
    print(f"\n{facts['cpu_count']} CPUs ({facts['cpu_model']}), Python {facts['python']}, {facts['filesystem']}")
    print(f"load average before / after: {facts['loadavg_before']} / {facts['loadavg_after']}")
    print(f"command: {out['command']}")
    for note in out["notes"]:
        print(f"note: {note}")


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the tollway engine end to end.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=None, help="load duration (default 10; quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="load warm-up before measuring (default 2)")
    parser.add_argument("--concurrency", type=int, default=128, help="concurrent callers (default 128)")
    parser.add_argument("--accounts", type=int, default=None, help="funded accounts (default 1000; quick 100)")
    parser.add_argument("--events-1m", type=int, default=None, help="events in the recovery dir (default 1000000)")
    parser.add_argument("--ceiling-seconds", type=float, default=None, help="each ceiling loop (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--durability",
        choices=[mode.value for mode in Durability],
        default=Durability.FSYNC.value,
        help="of the load phase (default fsync; none shows the engine's CPU-only limit)",
    )
    parser.add_argument(
        "--wal-syncer",
        choices=[mode.value for mode in WalSyncer],
        default=WalSyncer.PROCESS.value,
        help="who syncs the WAL in the load phase (default process, the production default; thread to compare)",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="project into a private redis-server during the load; adds projection lag and a Redis ceiling",
    )
    parser.add_argument(
        "--no-pump",
        action="store_true",
        help="with --redis: encode projection batches in the event loop instead of the projection pump process",
    )
    add_scratch_arguments(parser, "the scratch data directories")
    parser.add_argument("--only", action="append", choices=PHASES, help="run only these phases (repeatable)")
    parser.add_argument(
        "--callers",
        type=_counts,
        default=None,
        help="also run the load phase at each of these concurrencies, e.g. 1,4,16,128: CPU per event for each "
        "and the 16 over 128 ratio (issue 21's target: at most 2)",
    )
    parser.add_argument("--phase", choices=("load", "build", "open"), help=argparse.SUPPRESS)
    parser.add_argument("--phase-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else (1.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.2 if quick else 2.0)
    args.accounts = args.accounts if args.accounts is not None else (100 if quick else 1000)
    args.events_1m = args.events_1m if args.events_1m is not None else (20_000 if quick else 1_000_000)
    args.ceiling_seconds = args.ceiling_seconds if args.ceiling_seconds is not None else (0.25 if quick else 2.0)
    args.only = set(args.only or PHASES)
    if args.concurrency < 1 or args.accounts < 1:
        parser.error("--concurrency and --accounts must be positive")
    return args


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected whole numbers like 1,4,16,128, got {text!r}") from exc
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("every concurrency must be at least 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase is not None:
        print(json.dumps(run_phase(args)))
        return 0
    with scratch_dir(args.data_dir, ".tollway-bench-", args.keep) as root:
        out = summary(args, run_all(root, args), root)
    emit(out, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
