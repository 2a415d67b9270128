"""``bench/capacity.py`` runs end to end in quick mode and reports every figure. Nothing is asserted of speed."""

from __future__ import annotations

from pathlib import Path

from tests.bench_run import quick_report


def test_quick_run_reports_memory_snapshot_recovery_and_throughput(tmp_path: Path) -> None:
    report = quick_report("capacity.py", tmp_path)
    assert (2_000, 2_000) == (report["entries"], report["response_bytes"])
    for name in ("response_0_bytes", "response_2000_bytes"):
        run = report["memory"]["this"][name]
        assert 0 == run["entries_kept_whole"]  # every settled entry left memory but for its record
        assert run["snapshot_per_entry_bytes"] < 500  # records (and 256 KiB of empty index): never 2 KB responses
        assert run["recover_from_snapshot_s"] > 0
    assert [1, 1] == [len(report["throughput_pairs_per_s"]["this"]), len(report["cpu_us_per_pair"]["this"])]
    grown = report["growth"]["this"]
    assert 5_000 == grown["entries"]
    assert 0 < grown["worst_step_ms"]
    assert 0 <= grown["worst_step_at_entry"] < 5_000
    assert [] == list(tmp_path.iterdir())  # the scratch directory is removed
