"""What ``engine.py`` and ``http.py`` share: facts about the machine, the scratch directory, the output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final


def machine_facts(data_dir: Path) -> dict[str, Any]:
    """What every benchmark reports of its machine: CPUs and their idle states, Python speed, platform, filesystem."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpuidle": cpuidle(),
        "python_sum_5m_ms": python_speed_ms(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "filesystem": filesystem_type(data_dir),
    }


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine makes every figure noisier."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(value, 2) for value in os.getloadavg()]
    return None


def cpu_model() -> str | None:
    """The processor's model name (Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def cpuidle() -> dict[str, str | int | None] | None:
    """How an idle CPU waits (Linux): the cpuidle driver and governor, and a VM's guest halt-polling.

    With the ``haltpoll`` driver and ``guest_halt_poll_ns`` 0, an idle vCPU halts at once (a VM
    exit), so every wake-up of a process on it pays for the VM's scheduling: the wake-up probe
    (``ceiling.wakeup_*`` in ``http.py``) shows what that costs.
    """
    base = Path("/sys/devices/system/cpu/cpuidle")
    if not base.is_dir():
        return None

    def read(path: Path) -> str | None:
        with contextlib.suppress(OSError):
            return path.read_text().strip()
        return None

    poll_ns = read(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns"))
    return {
        "driver": read(base / "current_driver"),
        "governor": read(base / "current_governor"),
        "guest_halt_poll_ns": int(poll_ns) if poll_ns is not None and poll_ns.isdigit() else None,
    }


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (Linux), from the longest matching mount."""
    best: tuple[int, str] | None = None
    resolved = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            mount, kind = line.split()[1:3]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and (best is None or len(mount) > best[0]):
                best = (len(mount), kind)
    return None if best is None else best[1]


def python_speed_ms(repeat: int = 5) -> float:
    """Best of ``repeat`` timings of ``sum(range(5_000_000))`` in ms: this CPU's pure-Python speed.

    Figures from different machines (or from one VM on a busy host) differ by the ratio of this
    number far more than by any code change; the benchmarks report it so they can be compared.
    """
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        sum(range(5_000_000))
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


WAKEUP_SLEEP_S = 0.0005


@contextlib.contextmanager
def pinned_to(cpu: int | None) -> Iterator[bool]:
    """Run the calling thread on ``cpu`` inside the block (when given and allowed); yields whether it is."""
    pinned = cpu is not None and hasattr(os, "sched_setaffinity") and cpu in os.sched_getaffinity(0)
    previous = os.sched_getaffinity(0) if pinned else None
    if cpu is not None and pinned:
        os.sched_setaffinity(0, {cpu})
    try:
        yield pinned
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


def wakeup_latency(seconds: float, cpu: int | None = None) -> dict[str, Any]:
    """How late this machine wakes a thread that sleeps 0.5 ms, nothing else running (on ``cpu`` if given).

    Every request waits for a few such wake-ups (a server wakes on the request, the WAL's sync
    helper on the sync, the server on its answer, the client on the response), so on a machine
    whose wake-ups are often late — a VM whose virtual CPU the host deschedules — no tail
    latency can be low, whatever the code does. ``wakeup_p99_ms`` is that floor for each hop.
    """
    late_ns: list[int] = []
    with pinned_to(cpu) as pinned:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter_ns()
            time.sleep(WAKEUP_SLEEP_S)
            late_ns.append(time.perf_counter_ns() - started - int(WAKEUP_SLEEP_S * 1e9))
    late_ns.sort()

    def at(share: float) -> float:
        return round(late_ns[min(len(late_ns) - 1, int(share * len(late_ns)))] / 1e6, 3)

    return {
        "wakeup_p50_ms": at(0.5),
        "wakeup_p99_ms": at(0.99),
        "wakeup_p999_ms": at(0.999),
        "wakeup_max_ms": at(1.0),
        "wakeup_cpu": cpu if pinned else None,
    }


IDLE_GAPS_MS: Final = (0.5, 1.0, 3.0, 10.0)
_WORK: Final = [{"id": i, "name": f"item-{i}", "values": [i] * 5} for i in range(15)]


def _work_unit() -> int:
    """A few tens of microseconds of ordinary Python: JSON out and back, as a request handler does."""
    return len(json.loads(json.dumps(_WORK)))


def idle_cost(rounds: int, cpu: int | None = None) -> dict[str, Any]:
    """How much more CPU the same small piece of work takes right after the CPU sat idle (on ``cpu`` if given).

    Each round sleeps for each of :data:`IDLE_GAPS_MS` in turn, then times one work unit (cold:
    the CPU was idle for the gap) and at once another (warm), in thread CPU time; the gaps are
    interleaved so a drift of the machine's speed touches them alike. ``idle_cost_ratio`` maps
    each gap to median cold over median warm. On real hardware it stays near 1; on a VM whose
    idle virtual CPU halts into the hypervisor, caches and branch predictors go cold while it
    waits, and the ratio grows with the gap. A server at partial load idles between requests,
    so there each request costs more than at full load: CPU per request rises as the rate
    falls, and 80 % of the closed-loop maximum can fill the core.
    """
    cold: dict[float, list[int]] = {gap: [] for gap in IDLE_GAPS_MS}
    warm: dict[float, list[int]] = {gap: [] for gap in IDLE_GAPS_MS}
    with pinned_to(cpu) as pinned:
        _work_unit()
        for _ in range(rounds):
            for gap in IDLE_GAPS_MS:
                time.sleep(gap / 1000)
                started = time.thread_time_ns()
                _work_unit()
                middle = time.thread_time_ns()
                _work_unit()
                cold[gap].append(middle - started)
                warm[gap].append(time.thread_time_ns() - middle)
    warm_all = statistics.median(sample for samples in warm.values() for sample in samples)
    return {
        "idle_cost_work_us": round(warm_all / 1000, 1),
        "idle_cost_ratio": {
            f"{gap:g}ms": round(statistics.median(cold[gap]) / max(1.0, statistics.median(warm[gap])), 2)
            for gap in IDLE_GAPS_MS
        },
        "idle_cost_cpu": cpu if pinned else None,
    }


SLOW_BIN_MS: Final = 20
SLOW_FACTOR: Final = 2.0


def slow_windows(seconds: float, cpu: int | None = None) -> dict[str, Any]:
    """Whether this CPU runs at an even speed: the same small work back to back, timed in 20 ms windows.

    Nothing else of the benchmark runs meanwhile, so on real hardware every window's mean work
    time is about the same. On a VM sharing its host, some windows can be several times slower
    (a busy neighbour, the host's own work) although the virtual CPU never stops. A request
    answered in such a window is late however light the load, so ``slow_share`` (the share of
    windows whose mean is at least twice the median window's) bounds the tail: with a few per
    cent of the time slow, a p99 lands in it. ``slow_worst`` is the slowest window over the median.
    """
    bins: dict[int, list[int]] = {}
    with pinned_to(cpu) as pinned:
        _work_unit()
        start = time.perf_counter_ns()
        end = start + int(seconds * 1e9)
        while (now := time.perf_counter_ns()) < end:
            _work_unit()
            bins.setdefault((now - start) // (SLOW_BIN_MS * 1_000_000), []).append(time.perf_counter_ns() - now)
    means = [sum(samples) / len(samples) for samples in bins.values() if samples]
    median = statistics.median(means)
    return {
        "slow_share": round(sum(1 for mean in means if mean >= SLOW_FACTOR * median) / len(means), 4),
        "slow_worst": round(max(means) / median, 1),
        "slow_windows": len(means),
        "slow_cpu": cpu if pinned else None,
    }


def add_scratch_arguments(parser: argparse.ArgumentParser, keeps: str = "the scratch directory") -> None:
    """``--data-dir`` and ``--keep``, the options every benchmark hands to :func:`scratch_dir`."""
    parser.add_argument("--data-dir", type=Path, default=None, help="parent of the scratch directory (default: cwd)")
    parser.add_argument("--keep", action="store_true", help=f"keep {keeps}")


@contextlib.contextmanager
def scratch_dir(parent: Path | None, prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh directory in ``parent`` (default: the current directory), removed afterwards unless ``keep``."""
    base = parent if parent is not None else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def emit(out: dict[str, Any], as_json: bool, print_table: Callable[[dict[str, Any]], None]) -> None:
    """Print the report: one JSON object, or the table."""
    if as_json:
        print(json.dumps(out))
    else:
        print_table(out)
