"""What the HTTP layer costs per request, in process: ``python bench/asgi.py --json``.

Reserve → commit pairs run three ways, each on a fresh :class:`~tollway.service.Service` (no
background tasks, ``durability = none``: neither the projection nor the disk is measured, only
the CPU of this process):

- ``engine``: ``Engine.execute`` of the two commands, nothing else (the ceiling: what a pair
  costs without HTTP);
- ``hot_path``: the ASGI app of ``tollway serve`` called directly with a request scope, as
  uvicorn would call it (authentication, validation, the hot path's answer and its JSON);
- ``router``: the same app built with ``hot_path=False``, so every request goes through
  FastAPI's middleware stack, router and dependencies.

It reports ``cpu_us_per_pair`` of each (the median over ``--rounds``, the arms alternating
within each round) and ``http_us_per_pair``: what the app adds to the engine. Socket I/O and
uvicorn's HTTP parsing are not included (``bench/http.py`` measures the whole stack). CPU time
is ``time.process_time`` of this process: steadier than rates on a noisy machine, and what the
server's core spends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: the repository root instead of bench/, where
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # http.py would shadow the stdlib's http

from bench.machine import add_scratch_arguments, emit, loadavg, machine_facts, scratch_dir
from tollway import Settings
from tollway.api import Authenticator, create_app
from tollway.api.auth import Scope, development_key, token_claims
from tollway.config import Durability
from tollway.core import commands as cmd
from tollway.service import Service

ARMS: Final = ("engine", "hot_path", "router")
FUNDING_MICRO: Final = 10**15
ESTIMATE_MICRO: Final = 20_000
ACTUAL_MICRO: Final = 12_345
TOKEN_TTL_S: Final = 3600

Pair = Callable[[int], Awaitable[None]]


class BenchError(RuntimeError):
    """A request was not answered as a successful pair is: the figures are void."""


def asgi_caller(app: Any) -> Callable[[str, bytes, str], Awaitable[tuple[int, bytes]]]:
    """``call(path, body, token)``: one ``POST`` through ``app``, as uvicorn would send it."""

    async def call(path: str, body: bytes, token: str) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "scheme": "http",
            "server": ("bench", 80),
            "client": ("127.0.0.1", 1),
            "headers": [
                (b"host", b"bench"),
                (b"authorization", b"Bearer " + token.encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
        delivered = False
        answer: dict[str, Any] = {"body": b""}

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:  # the app asks again only to watch for a disconnect
                await asyncio.Event().wait()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")

        await app(scope, receive, send)
        return answer["status"], answer["body"]

    return call


def http_pair(app: Any, gateway: str, run: str) -> Pair:
    call = asgi_caller(app)

    async def pair(index: int) -> None:
        body = b'{"account_id":"a","request_id":"%s-%d","estimated_cost_micro":"%d"}' % (
            run.encode(),
            index,
            ESTIMATE_MICRO,
        )
        status, answer = await call("/v1/reservations", body, gateway)
        if status != 201:
            raise BenchError(f"reserve answered {status}: {answer[:300]!r}")
        entry_id = json.loads(answer)["billing_entry_id"]
        commit = b'{"actual_cost_micro":"%d"}' % ACTUAL_MICRO
        status, answer = await call(f"/v1/reservations/{entry_id}/commit", commit, gateway)
        if status != 200:
            raise BenchError(f"commit answered {status}: {answer[:300]!r}")

    return pair


def engine_pair(service: Service, run: str) -> Pair:
    async def pair(index: int) -> None:
        reserved = await service.engine.execute(cmd.Reserve("a", f"{run}-{index}", ESTIMATE_MICRO))
        if not isinstance(reserved, cmd.EntryResult):
            raise BenchError(f"reserve refused: {reserved}")
        committed = await service.engine.execute(cmd.Commit(reserved.entry.billing_entry_id, ACTUAL_MICRO))
        if not isinstance(committed, cmd.EntryResult):
            raise BenchError(f"commit refused: {committed}")

    return pair


async def measure(data_dir: Path, arm: str, pairs: int, warmup: int) -> float:
    """CPU µs per pair of ``arm`` on a fresh service in ``data_dir``."""
    settings = Settings(data_dir=data_dir, durability=Durability.NONE)
    async with Service.running(settings, background=False) as service:
        minted = await service.engine.execute(cmd.Credit("a", "fund", cmd.CreditKind.MINT, FUNDING_MICRO))
        if not isinstance(minted, cmd.CreditResult):
            raise BenchError(f"funding refused: {minted}")
        if arm == "engine":
            pair = engine_pair(service, arm)
        else:
            key, _ = development_key(settings)
            claims = token_claims(
                [Scope.GATEWAY.value],
                subject="bench",
                audience=settings.auth_audience,
                issuer=settings.auth_issuer,
                now_s=int(time.time()),
                ttl_s=TOKEN_TTL_S,
                accounts=None,
            )
            app = create_app(service, authenticator=Authenticator.from_settings(settings), hot_path=arm == "hot_path")
            pair = http_pair(app, key.sign(claims), arm)
        for index in range(warmup):
            await pair(-1 - index)
        started = time.process_time()
        for index in range(pairs):
            await pair(index)
        return (time.process_time() - started) / pairs * 1e6


def run(root: Path, pairs: int, warmup: int, rounds: int) -> dict[str, Any]:
    before, started = loadavg(), time.perf_counter()
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for number in range(rounds):
        for arm in ARMS:
            samples[arm].append(round(asyncio.run(measure(root / f"{arm}-{number}", arm, pairs, warmup)), 1))
    median = {arm: round(statistics.median(values), 1) for arm, values in samples.items()}
    return {
        "pairs": pairs,
        "rounds": rounds,
        "cpu_us_per_pair": {arm: median[arm] for arm in ("hot_path", "router")},
        "http_us_per_pair": {arm: round(median[arm] - median["engine"], 1) for arm in ("hot_path", "router")},
        "ceiling": {"engine_cpu_us_per_pair": median["engine"]},
        "samples": samples,
        "machine": machine_facts(root)
        | {"loadavg_before": before, "loadavg_after": loadavg(), "run_s": round(time.perf_counter() - started, 1)},
        "command": "python bench/asgi.py " + " ".join(sys.argv[1:]),
        "notes": [
            "durability none, no background tasks: the CPU of this process only (no disk, no projection)",
            "hot_path: the app as tollway serve builds it; router: the same with hot_path=False",
            "http_us_per_pair: what the app adds to the engine's own cost of the pair (two requests)",
            "medians over rounds; the arms alternate within each round, each on a fresh service",
        ],
    }


def print_table(out: dict[str, Any]) -> None:
    print(f"{'pairs':<26}{out['pairs']:>10} x {out['rounds']} rounds")
    print(f"{'engine alone (µs/pair)':<26}{out['ceiling']['engine_cpu_us_per_pair']:>10}")
    for arm in ("hot_path", "router"):
        print(f"{arm + ' (µs/pair)':<26}{out['cpu_us_per_pair'][arm]:>10}   http +{out['http_us_per_pair'][arm]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000, help="measured pairs per arm and round (default 20000)")
    parser.add_argument("--warmup", type=int, default=2_000, help="pairs before measuring (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three arms (default 3)")
    parser.add_argument("--quick", action="store_true", help="200 pairs, one round: a smoke test, not a measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_scratch_arguments(parser)
    args = parser.parse_args()
    pairs, warmup, rounds = (200, 20, 1) if args.quick else (args.pairs, args.warmup, args.rounds)
    with scratch_dir(args.data_dir, "tollway-asgi-", args.keep) as scratch:
        result = run(scratch, pairs, warmup, rounds)
    emit(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
