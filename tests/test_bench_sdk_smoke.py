"""bench/sdk.py runs end to end (a quick run): both request paths measured at each concurrency."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_run import quick_report


@pytest.mark.slow
def test_sdk_bench_quick_run_measures_both_paths(tmp_path: Path) -> None:
    """--quick --json: CPU per pair of the aiohttp path and the httpx transport at 1 and 16 callers, and their ratio."""
    report = quick_report("sdk.py", tmp_path)
    assert [1, 16] == [row["concurrency"] for row in report["results"]]
    for row in report["results"]:
        aiohttp, httpx = row["median"]["aiohttp"]["cpu_us_per_pair"], row["median"]["httpx"]["cpu_us_per_pair"]
        assert (True, True) == (aiohttp > 0, httpx > 0)
        assert round(httpx / aiohttp, 2) == row["httpx_over_aiohttp"]
    assert [] == list(tmp_path.iterdir())  # the scratch directory is removed afterwards
