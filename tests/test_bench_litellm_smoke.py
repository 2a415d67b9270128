"""bench/litellm.py runs end to end (a quick run) and reports both sides and a consistent balance."""

from __future__ import annotations

import pytest

from tests.bench_run import bench_report


@pytest.mark.slow
def test_litellm_bench_quick_run_reports_both_sides_and_charges_every_billed_call() -> None:
    """--quick --json: calls/s and latencies for the bare and billed proxies; every billed call charged, none held."""
    report = bench_report("litellm.py", "--quick", "--json", timeout_s=110)
    assert ("1.108.0", 20, 20) == (report["litellm_version"], report["bare"]["calls"], report["billed"]["calls"])
    check = report["check"]
    assert (check["expected_charged_micro"], 0) == (check["charged_micro"], check["held_micro"])
    assert report["bare"]["calls_per_s"] > 0
    assert report["billed"]["calls_per_s"] > 0
