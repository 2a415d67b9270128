"""``bench/rates.py`` runs end to end on small rates and reports each part of the server. Speed is never asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.bench_run import bench_report, run_bench

RUN_TIMEOUT_S = 60


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_each_rate_reports_the_cpu_of_every_part_of_the_server(tmp_path: Path) -> None:
    report = bench_report(
        "rates.py",
        *("--json", "--rates", "40,80", "--seconds", "1", "--warmup", "0.3", "--data-dir", str(tmp_path)),
        timeout_s=RUN_TIMEOUT_S,
    )
    assert [] == list(tmp_path.iterdir())  # the scratch directory is removed afterwards
    assert [40, 80] == [phase["rate_pairs_per_s"] for phase in report["phases"]]
    for phase in report["phases"]:
        parts = phase["parts"]
        assert {"server", "sync helper", "redis-server"} <= set(parts)
        assert parts["server"]["cpu_us_per_pair"] > 0  # the server's main thread did the work
        assert parts["sync helper"]["voluntary_switches_per_pair"] > 0  # it slept between syncs
        assert phase["core_busy"] == pytest.approx(sum(part["core_share"] for part in parts.values()), abs=0.01)
        assert phase["reserve_p99_ms"] >= phase["reserve_p50_ms"] > 0


@pytest.mark.parametrize("rates", ["0", "a,b", ",", "-5"])
def test_rates_must_be_positive_numbers(rates: str) -> None:
    done = run_bench("rates.py", "--rates", rates, timeout_s=RUN_TIMEOUT_S)
    assert 2 == done.returncode
    assert "--rates" in done.stderr
