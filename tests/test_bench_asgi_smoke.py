"""``bench/asgi.py`` runs end to end in quick mode and reports every figure. Nothing is asserted of speed."""

from __future__ import annotations

from pathlib import Path

from tests.bench_run import quick_report


def test_quick_run_reports_the_cost_of_each_arm(tmp_path: Path) -> None:
    report = quick_report("asgi.py", tmp_path)
    assert (200, 1) == (report["pairs"], report["rounds"])
    assert {"engine", "hot_path", "router"} == set(report["samples"])
    assert all(len(values) == 1 and values[0] > 0 for values in report["samples"].values())
    assert report["ceiling"]["engine_cpu_us_per_pair"] > 0
    for arm in ("hot_path", "router"):
        expected = round(report["cpu_us_per_pair"][arm] - report["ceiling"]["engine_cpu_us_per_pair"], 1)
        assert expected == report["http_us_per_pair"][arm]
    assert [] == list(tmp_path.iterdir())  # the scratch directory is removed
