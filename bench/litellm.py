"""What tollway's LiteLLM callback costs a LiteLLM proxy: calls/s and latency with and without it, in one run.

Starts the test upstream (``tests/litellm_upstream.py``: an OpenAI-compatible server answering at
once), one ``tollway serve`` (durability ``fsync``, as deployed) and three LiteLLM proxies from
``.venv-litellm`` (``make litellm-proxy``) with the same config: one with the callback (``billed``),
one with a callback whose hooks do nothing (``noop``: what LiteLLM's callback machinery costs by
itself) and one without (``bare``). Then, for ``--rounds`` rounds, ``--calls`` chat completions at
``--concurrency`` through each proxy with the ``openai`` client (the order rotates per round so no
side always runs first on a warmer machine). Reported: calls/s of each side (all rounds'
calls over all rounds' time), per-call latency p50/p99, the latency the callback adds (billed −
bare at p50 and p99) and ``callback_cost_share`` = 1 − billed/bare calls/s, with the target
(≤ 10 %), and the same against ``noop``; per side, the CPU per call of its proxy process and of
tollway (the service and its children: Redis, the projection pump, the sync helper). The billed
account's balance is checked afterwards: every billed call charged, nothing held.

    .venv/bin/python bench/litellm.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: the repository root instead of bench/, whose litellm.py is this
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM's bundled model map: no download at import

from tests.litellm_support import Proxy, Stack, ask, charge, running_stack
from tests.litellm_upstream import PROMPT_TOKENS

from bench.load import children_cpu_s, process_cpu_s

ACCOUNT: Final = "bench"
OUT_TOKENS: Final = 16
TARGET_COST_SHARE_MAX: Final = 0.10


def percentile(values: list[float], share: float) -> float:
    """The ``share`` percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def load(proxy: Proxy, calls: int, concurrency: int) -> tuple[float, list[float]]:
    """``calls`` completions at ``concurrency``: the wall time and each call's latency (seconds)."""
    client = proxy.openai(connections=concurrency * 2)
    request = ask(f"bench out={OUT_TOKENS}", ACCOUNT, max_tokens=OUT_TOKENS)
    latencies: list[float] = []
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            await client.chat.completions.create(**request)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return time.perf_counter() - began, latencies


def cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live children."""
    return (process_cpu_s(pid) or 0.0) + (children_cpu_s(pid) or 0.0)


@dataclass
class Totals:
    """One side's measurements summed over the rounds."""

    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    proxy_cpu_s: float = 0.0
    tollway_cpu_s: float = 0.0


async def measured_load(stack: Stack, proxy: Proxy, options: argparse.Namespace, totals: Totals) -> None:
    """One round of one side, with the CPU its proxy and tollway (service, Redis, helpers) spent meanwhile."""
    serve_pid = stack.serve.process.pid
    proxy_before, tollway_before = cpu_s(proxy.process.pid), cpu_s(serve_pid)
    wall_s, latencies = await load(proxy, options.calls, options.concurrency)
    totals.wall_s += wall_s
    totals.latencies += latencies
    totals.proxy_cpu_s += cpu_s(proxy.process.pid) - proxy_before
    totals.tollway_cpu_s += cpu_s(serve_pid) - tollway_before


def side(totals: Totals) -> dict[str, float]:
    """One side's figures."""
    wall_s, latencies = totals.wall_s, totals.latencies
    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / wall_s, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "proxy_cpu_ms_per_call": round(totals.proxy_cpu_s / len(latencies) * 1000, 2),
        "tollway_cpu_ms_per_call": round(totals.tollway_cpu_s / len(latencies) * 1000, 2),
    }


async def measure(stack: Stack, options: argparse.Namespace) -> dict[str, Any]:
    """The rounds, then the billed account's check."""
    names = ("bare", "billed") if options.quick else ("bare", "noop", "billed")
    sides = dict(zip(names, stack.proxies, strict=True))
    async with stack.admin() as admin:
        await admin.credit(ACCOUNT, "bench-mint", 10**12)
    for proxy in sides.values():  # warm them: connections, LiteLLM's first-call caches
        await load(proxy, options.warmup, options.concurrency)
    totals = {name: Totals() for name in sides}
    for index in range(options.rounds):
        order = list(sides.items())
        for name, proxy in order[index % len(order) :] + order[: index % len(order)]:
            await measured_load(stack, proxy, options, totals[name])
    report = {name: side(figures) for name, figures in totals.items()}
    share = 1 - report["billed"]["calls_per_s"] / report["bare"]["calls_per_s"]
    async with stack.gateway() as gateway:
        for _ in range(300):  # the last commits land just after the answers: up to 30 s
            balance = await gateway.balance(ACCOUNT)
            if balance.held_micro == 0:
                break
            await asyncio.sleep(0.1)
    billed_calls = options.warmup + options.rounds * options.calls
    return {
        "litellm_version": importlib.metadata.version("litellm"),
        "calls_per_side": options.rounds * options.calls,
        "concurrency": options.concurrency,
        "rounds": options.rounds,
        "bare": report["bare"],
        "noop": report.get("noop"),
        "billed": report["billed"],
        "added_latency_ms": {
            "p50": round(report["billed"]["p50_ms"] - report["bare"]["p50_ms"], 2),
            "p99": round(report["billed"]["p99_ms"] - report["bare"]["p99_ms"], 2),
        },
        "callback_cost_share": round(share, 4),
        "callback_cost_share_vs_noop": (
            round(1 - report["billed"]["calls_per_s"] / report["noop"]["calls_per_s"], 4) if "noop" in report else None
        ),
        "target": {"callback_cost_share_max": TARGET_COST_SHARE_MAX, "met": share <= TARGET_COST_SHARE_MAX},
        "check": {
            "billed_calls": billed_calls,
            "charged_micro": balance.charged_micro,
            "expected_charged_micro": billed_calls * charge("gpt-4o-mini", PROMPT_TOKENS, OUT_TOKENS),
            "held_micro": balance.held_micro,
        },
    }


def main() -> None:
    """Parse the options, start the processes, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="calls per side and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=50, help="calls per side before measuring")
    parser.add_argument("--quick", action="store_true", help="a small run without the noop side (smoke test)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    options = parser.parse_args()
    if options.quick:
        options.calls, options.rounds, options.warmup, options.concurrency = 20, 1, 5, 4
    with tempfile.TemporaryDirectory(prefix="tollway-bench-litellm-") as work:
        proxies: dict[str, dict[str, Any]] = {"proxy-bare": {"callback": None}}
        if not options.quick:  # a smoke test spares the third proxy's start (~10 s of CPU)
            proxies["proxy-noop"] = {"callback": "noop"}
        proxies["proxy-billed"] = {}
        with running_stack(Path(work), proxies, durability="fsync") as stack:
            report = asyncio.run(measure(stack, options))
    print(json.dumps(report, indent=None if options.json else 2))


if __name__ == "__main__":
    main()
