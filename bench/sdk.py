"""What the SDK costs the process that calls it: ``python bench/sdk.py --json``.

A gateway (the LiteLLM callback, say) pays the SDK's CPU on every model call, on the same core
as its own work. This starts one ``tollway serve`` (as ``bench/http.py`` does, not pinned) and,
in this process, runs reserve → commit pairs through :class:`tollway.client.AsyncClient` two
ways, alternating over ``--rounds``: ``aiohttp`` (the SDK's own request path) and ``httpx``
(the same client given an ``httpx.AsyncHTTPTransport`` with a pool of ``--connections``, as the
SDK sent every request before). Each at every ``--concurrency`` (callers sharing one client).
Reported: this process's CPU per pair (``time.process_time``: steadier than rates on a shared
machine) and pairs/s, each round's value and the median, and ``httpx_over_aiohttp``, the ratio
of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: the repository root instead of bench/, where
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # http.py would shadow the stdlib's http

import httpx

from bench.load import account_name
from bench.machine import add_scratch_arguments, emit, loadavg, machine_facts, scratch_dir
from bench.server import fund, served, wait_ready
from tollway.client import AsyncClient

ARMS: Final = ("aiohttp", "httpx")
MODEL: Final = "gpt-4o-mini"
WARMUP_PAIRS_PER_CALLER: Final = 20


def client(arm: str, url: str, token: str, connections: int) -> AsyncClient:
    """The SDK client of ``arm``."""
    if arm == "aiohttp":
        return AsyncClient(url, token, connections_max=connections)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return AsyncClient(url, token, transport=httpx.AsyncHTTPTransport(limits=limits))


async def pairs(sdk: AsyncClient, tag: str, callers: int, each: int) -> None:
    """``callers`` concurrent loops of ``each`` reserve → commit pairs (token counts priced by the server)."""

    async def caller(number: int) -> None:
        for index in range(each):
            hold = await sdk.reserve(
                account_name(0), f"{tag}-{number}-{index}", model=MODEL, input_tokens=20, max_output_tokens=16
            )
            await sdk.commit(hold.billing_entry_id, input_tokens=20, output_tokens=16, model=MODEL)

    await asyncio.gather(*(caller(number) for number in range(callers)))


async def measure(
    url: str, token: str, arm: str, callers: int, *, count: int, connections: int, tag: str
) -> dict[str, float]:
    """CPU µs per pair and pairs/s of ``arm`` at ``callers``, on a fresh client after a warm-up."""
    async with client(arm, url, token, connections) as sdk:
        await pairs(sdk, f"{tag}-warm", callers, WARMUP_PAIRS_PER_CALLER)
        each = max(1, count // callers)
        cpu, wall = time.process_time(), time.perf_counter()
        await pairs(sdk, tag, callers, each)
        done = each * callers
        return {
            "cpu_us_per_pair": round((time.process_time() - cpu) / done * 1e6, 1),
            "pairs_per_s": round(done / (time.perf_counter() - wall), 1),
        }


async def run(root: Path, options: argparse.Namespace) -> dict[str, Any]:
    before, started = loadavg(), time.perf_counter()
    samples: dict[int, dict[str, list[dict[str, float]]]] = {c: {arm: [] for arm in ARMS} for c in options.concurrency}
    with served(root, "warning", pin=False) as server:
        target = server.target
        await wait_ready(target)
        await fund(target, 1)
        url = f"http://{target.host}:{target.port}"
        for number in range(options.rounds):
            for callers in options.concurrency:
                order = ARMS if number % 2 == 0 else ARMS[::-1]
                for arm in order:
                    tag = f"{arm}-{number}-{callers}"
                    found = await measure(
                        url,
                        target.gateway_token,
                        arm,
                        callers,
                        count=options.pairs,
                        connections=options.connections,
                        tag=tag,
                    )
                    samples[callers][arm].append(found)
    results = []
    for callers, arms in samples.items():
        median = {
            arm: {key: statistics.median(s[key] for s in runs) for key in ("cpu_us_per_pair", "pairs_per_s")}
            for arm, runs in arms.items()
        }
        results.append(
            {
                "concurrency": callers,
                "median": median,
                "httpx_over_aiohttp": round(
                    median["httpx"]["cpu_us_per_pair"] / median["aiohttp"]["cpu_us_per_pair"], 2
                ),
                "rounds": arms,
            }
        )
    return {
        "pairs": options.pairs,
        "connections": options.connections,
        "results": results,
        "machine": machine_facts(root)
        | {"loadavg_before": before, "loadavg_after": loadavg(), "run_s": round(time.perf_counter() - started, 1)},
        "command": "python bench/sdk.py " + " ".join(sys.argv[1:]),
        "notes": [
            "client_cpu: time.process_time of this process (the caller of the SDK), per reserve + commit pair",
            "aiohttp: the SDK's own request path; httpx: the same client through an httpx transport",
            "the arms alternate within each round (the first arm alternates between rounds)",
        ],
    }


def print_table(out: dict[str, Any]) -> None:
    print(f"{'callers':<10}{'aiohttp µs/pair':>18}{'httpx µs/pair':>16}{'ratio':>8}")
    for row in out["results"]:
        med = row["median"]
        aio, hx = med["aiohttp"]["cpu_us_per_pair"], med["httpx"]["cpu_us_per_pair"]
        print(f"{row['concurrency']:<10}{aio:>18}{hx:>16}{row['httpx_over_aiohttp']:>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="measured pairs per arm, concurrency and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both arms (default 3)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16],
        help="callers sharing one client, comma-separated (default 1,16)",
    )
    parser.add_argument("--connections", type=int, default=200, help="the pool size of both arms (the callback's)")
    parser.add_argument("--quick", action="store_true", help="40 pairs, one round: a smoke test, not a measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_scratch_arguments(parser)
    options = parser.parse_args()
    if options.quick:
        options.pairs, options.rounds = 40, 1
    with scratch_dir(options.data_dir, "tollway-sdk-", options.keep) as scratch:
        result = asyncio.run(run(scratch, options))
    emit(result, options.json, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
