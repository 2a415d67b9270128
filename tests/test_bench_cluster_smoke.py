"""``bench/cluster.py`` runs end to end in quick mode and reports every figure. Nothing is asserted of speed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.bench_run import quick_report

pytestmark = pytest.mark.timeout(240)


def test_quick_run_measures_both_logs_and_a_failover() -> None:
    """Both engines get every command and a rate; a killed node's shard answers again; the scratch is removed."""
    parent = Path(tempfile.mkdtemp(prefix="tollway-bench-cluster-"))
    parent.chmod(0o711)  # as root the server runs as `nobody`, who must search its way in
    try:
        report = quick_report("cluster.py", parent)
        assert [] == list(parent.iterdir())
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    engine = report["engine"]
    assert (500, 500) == (engine["file_wal"]["events"], engine["pg"]["events"])
    assert engine["pg"]["events_per_s"] > 0
    assert engine["pg_over_file_wal"] > 0
    assert report["failover"]["kill_to_answer_s"] > 0
