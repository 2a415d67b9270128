"""A killed embedded redis-server is brought back by ``tollway serve`` itself, and nothing is left unsettled.

Real processes: ``tollway serve`` with its embedded Redis, ``tollway settlement-sim``, gateways
over HTTP. ``kill -9`` of the service's own redis-server under load used to leave it dead for
good while ``/readyz`` said ready and commits piled up in ``FINALIZE_PENDING``. Now the service
restarts it, rebuilds the projection from the WAL, and the worker finalizes every commit once —
without a restart of tollway.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Final

import httpx
import pytest

from tests.e2e_support import REDIS_BINARY_NAME, Simulator, audit, children_named, sdk, serving
from tests.test_e2e_settlement import ACCOUNTS, MINT_MICRO, _burst, _wait_all_acked
from tollway.client import AsyncClient

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server")

SEED: Final = 20_261_207
RESTART_TIMEOUT_S: Final = 20.0


async def _restarted(client: AsyncClient, old_pid: int) -> dict[str, object]:
    """Poll ``/readyz`` until the embedded Redis runs again under a new pid; its ``embedded`` section."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        embedded = (await client.ready())["redis"]["embedded"]
        if embedded["running"] and embedded["restarts"] and embedded["pid"] not in (None, old_pid):
            return dict(embedded)  # restarts counts a server that answers PING; running alone may still boot
        assert time.monotonic() < deadline, f"the embedded redis-server was not restarted: {embedded}"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_a_killed_embedded_redis_is_restarted_and_every_commit_finalized_once(tmp_path: Path) -> None:
    """kill -9 of the service's redis-server under load: restarted, projection rebuilt, every commit settled once."""
    rng, data = random.Random(SEED), tmp_path / "d"
    sim = Simulator(data, tmp_path)
    try:
        await sim.ready()
        async with serving(data, tmp_path, "serve", settlement_url=sim.url) as serve:
            admin_token, gateway_token = serve.printed_token("admin"), serve.printed_token("gateway")
            async with sdk(serve.url, gateway_token) as gateway, sdk(serve.url, admin_token) as admin:
                for account in ACCOUNTS:
                    await admin.credit(account, f"mint-{account}", MINT_MICRO)
                committed = await _burst(gateway, "before", 3, rng)
                (old_pid,) = serve.redis_pids
                load = asyncio.create_task(_burst(gateway, "during", 6, rng))
                await asyncio.sleep(0.05)
                os.kill(old_pid, signal.SIGKILL)
                committed += await load  # billing goes on from the WAL: every commit answered
                embedded = await _restarted(admin, old_pid)
                assert (1, "killed by SIGKILL") == (embedded["restarts"], embedded["last_exit"])
                serve.redis_pids = children_named(serve.process.pid, REDIS_BINARY_NAME)
                assert [embedded["pid"]] == serve.redis_pids
                committed += await _burst(gateway, "after", 3, rng)
                settled = await _wait_all_acked(admin, len(committed))
                charged = {entry.billing_entry_id: entry.charged_micro for entry in committed}
                assert charged == {entry.billing_entry_id: entry.charged_micro for entry in settled}
                async with httpx.AsyncClient(base_url=serve.url) as http:
                    metrics = (await http.get("/metrics")).text
                assert "billing_embedded_redis_restarts 1.0" in metrics
                assert "billing_embedded_redis_up 1.0" in metrics
            assert serve.process.popen.poll() is None  # the same tollway process all along
            assert "the embedded redis-server died (killed by SIGKILL)" in serve.process.err_path.read_text()
            assert 0 == await serve.sigterm()
        finalized = await sim.finalized()
        assert [] == [key for key, n in Counter(item.reservation_id for item in finalized).items() if n > 1]
        assert charged == {item.reservation_id: item.actual_cost_micro for item in finalized}
    finally:
        await sim.close()
    result = await audit(data, tmp_path)
    assert 0 == result.returncode, result.stdout + result.stderr
