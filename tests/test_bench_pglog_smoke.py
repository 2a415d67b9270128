"""``bench/pglog.py`` runs end to end in quick mode and reports every figure. Nothing is asserted of speed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.bench_run import quick_report


def test_quick_run_measures_both_logs() -> None:
    """Both logs get every batch and a rate; the scratch directory is removed."""
    parent = Path(tempfile.mkdtemp(prefix="tollway-bench-pglog-"))
    parent.chmod(0o711)  # as root the server runs as `nobody`, who must search its way in
    try:
        report = quick_report("pglog.py", parent)
        assert [] == list(parent.iterdir())
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert (20, 128) == (report["batches"], report["batch_records"])
    for phase in ("file_wal", "pg", "pg_copy"):
        assert report[phase]["events_per_s"] > 0
        assert report[phase]["batch_p99_ms"] >= report[phase]["batch_p50_ms"] > 0
    assert ("on", "on") == (report["pg_settings"]["fsync"], report["pg_settings"]["synchronous_commit"])
    assert report["pg_over_file_wal"] > 0
