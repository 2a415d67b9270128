"""What entry retention gives back and what archiving costs: ``python bench/retention.py --json``.

A :class:`~tollway.service.Service` (engine, embedded ``redis-server``, projector; fsync on) on
a fake clock: ``--entries`` reserve → commit pairs, each with a small stored response, then the
clock moves past the retention and :meth:`~tollway.engine.Engine.archive_once` archives them all.
It reports

- ``archive_entries_per_s``: entries archived per second of ``archive_once`` (``entries_archived``
  events of 500, each waiting for its sync), and ``projected_s``: until Redis applied them too;
- ``redis_used_memory_mb`` and ``snapshot_mb``, ``before`` and ``after``: Redis's
  ``used_memory`` and the size of a snapshot taken at each point;
- ``ceiling.create_entries_per_s``: how fast the same run created the entries (a reserve and a
  commit each, 1,000 at a time): archiving an entry should cost far less than making it.

Nothing here is asserted; the figures vary with the machine (``machine`` in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root instead of bench/, where
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # http.py would shadow the stdlib's http

from bench.machine import add_scratch_arguments, emit, loadavg, machine_facts, scratch_dir
from tollway import Settings
from tollway.core import commands as cmd
from tollway.housekeeping import archive_once
from tollway.service import Service
from tollway.testing import FakeClock

RESPONSE = '{"id":"chatcmpl-1","usage":{"prompt_tokens":10,"completion_tokens":20}}'
CONCURRENCY = 1000
CATCH_UP_TIMEOUT_S = 120.0


async def caught_up(service: Service) -> None:
    """Wait until Redis holds every event the engine applied."""
    async with asyncio.timeout(CATCH_UP_TIMEOUT_S):
        while service.projector.applied_seq != service.engine.state.last_sequence:  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.01)


async def snapshot_mb(service: Service) -> float:
    """Take a snapshot now; the size of the newest one, in MB."""
    await service.engine.snapshot_now()
    newest = max(service.settings.snapshot_dir.iterdir(), key=lambda path: path.name)
    return round(newest.stat().st_size / 1e6, 3)


async def redis_mb(service: Service) -> float:
    info = await service.redis.info("memory")
    return round(int(info["used_memory"]) / 1e6, 2)


async def run(data_dir: Path, entries: int) -> dict[str, Any]:
    clock = FakeClock()
    settings = Settings(data_dir=data_dir, snapshot_every_events=10**12)
    async with Service.running(settings, clock=clock) as service:
        engine = service.engine
        await engine.execute(cmd.Credit("acct", "fund", cmd.CreditKind.MINT, 10**15))

        async def pair(i: int) -> None:
            held = await engine.execute(cmd.Reserve("acct", f"r{i}", 10_000))
            assert isinstance(held, cmd.EntryResult), held
            done = await engine.execute(cmd.Commit(held.entry.billing_entry_id, 7_000, response_json=RESPONSE))
            assert isinstance(done, cmd.EntryResult), done

        started = time.perf_counter()
        for first in range(0, entries, CONCURRENCY):
            await asyncio.gather(*(pair(i) for i in range(first, min(entries, first + CONCURRENCY))))
        created_s = time.perf_counter() - started
        await caught_up(service)
        before = {"redis_used_memory_mb": await redis_mb(service), "snapshot_mb": await snapshot_mb(service)}
        clock.advance((settings.entry_retention_hours + 1) * 3_600_000)
        started = time.perf_counter()
        archived = (await archive_once(engine)).entries
        archive_s = time.perf_counter() - started
        await caught_up(service)
        projected_s = time.perf_counter() - started
        after = {"redis_used_memory_mb": await redis_mb(service), "snapshot_mb": await snapshot_mb(service)}
        left = len(engine.state.entries) + len(engine.state.settled)
    return {
        "entries": entries,
        "archived": archived,
        "entries_left": left,
        "archive_s": round(archive_s, 3),
        "archive_entries_per_s": round(archived / archive_s) if archive_s else None,
        "projected_s": round(projected_s, 3),
        "before": before,
        "after": after,
        "ceiling": {"create_entries_per_s": round(entries / created_s), "create_s": round(created_s, 3)},
        "machine": machine_facts(data_dir.parent) | {"loadavg": loadavg()},
        "command": " ".join(["python", *sys.argv]),
        "notes": [
            "fsync on; the service's projector applies the archive to its embedded redis-server",
            "each entry: a reserve, a commit and a stored response of about 70 bytes",
            "archive_entries_per_s: archive_once wall time; events of 500 entries, each waiting for its WAL sync",
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50_000, help="entries to create and archive (default 50000)")
    parser.add_argument("--quick", action="store_true", help="2,000 entries: a smoke test, not a measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default: indented)")
    add_scratch_arguments(parser)
    args = parser.parse_args()
    with scratch_dir(args.data_dir, "tollway-retention-", args.keep) as scratch:
        result = asyncio.run(run(scratch / "data", 2_000 if args.quick else args.entries))
    emit(result, args.json, lambda out: print(json.dumps(out, indent=2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
