"""``bench/cluster.py`` runs end to end in quick mode and reports every figure. Nothing is asserted of speed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.bench_run import quick_report

pytestmark = pytest.mark.timeout(240)

OPEN_LOOP_KEYS = {
    "rate_pairs_per_s",
    "reserve_p50_ms",
    "reserve_p99_ms",
    "start_lag_p99_ms",
    "generator_lag_p99_ms",
    "generator_cpu_busy",
    "nodes_cpu_busy",
    "valid",
}


def test_quick_run_measures_both_logs_http_arms_and_both_failovers() -> None:
    """Both engines, three HTTP arms with a tail at half their maximum, a node and a primary killed; scratch removed."""
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
    http = report["http"]
    runs = {run["arm"]: run for run in http["runs"]}
    assert ["1 node", "2 nodes", "2 processes"] == list(runs)
    assert [1, 2, 2] == [len(run["nodes_cpu_busy"]) for run in runs.values()]  # each node's CPU, children too
    for run in runs.values():
        assert run["pairs_per_s"] > 0
        assert run["generator_cpu_busy"] is not None
        tail = run["open_loop"]
        assert OPEN_LOOP_KEYS <= set(tail)
        assert tail["scheduled"] == tail["completed"] > 0
        expected = [tail["reserve_p50_ms"], tail["reserve_p99_ms"]] if tail["valid"] else [None, None]
        assert expected == [run["reserve_p50_ms_at_50pct"], run["reserve_p99_ms_at_50pct"]]
    assert http["two_over_one"] > 0
    assert http["processes_over_one"] > 0
    assert "wrk" in http["generator"]
    assert report["failover"]["kill_to_answer_s"] > 0
    down = report["pg_failover"]
    assert 0 < down["kill_to_promoted_s"]
    assert 0 < down["kill_to_first_ack_s"] <= down["kill_to_all_shards_ack_s"]
    assert down["nodes_kept_running"]
    assert report["machine"]["loadavg_before"] is not None
