"""``bench/retention.py`` runs end to end in quick mode and reports every figure. Nothing is asserted of speed."""

from __future__ import annotations

from pathlib import Path

from tests.bench_run import quick_report


def test_quick_run_archives_everything_and_reports_its_figures(tmp_path: Path) -> None:
    report = quick_report("retention.py", tmp_path)
    assert (2_000, 2_000, 0) == (report["entries"], report["archived"], report["entries_left"])
    assert report["archive_entries_per_s"] > 0
    assert report["ceiling"]["create_entries_per_s"] > 0
    for point in ("before", "after"):
        assert {"redis_used_memory_mb", "snapshot_mb"} == set(report[point])
    assert report["after"]["snapshot_mb"] < report["before"]["snapshot_mb"]  # the entries left the snapshot
    assert [] == list(tmp_path.iterdir())  # the scratch directory is removed
