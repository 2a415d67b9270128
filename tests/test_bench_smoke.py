"""The benchmark runs end to end in quick mode and reports every key. Performance is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "engine.py"

NUMBERS = (
    "events_per_s",
    "pairs_per_s",
    "reserve_p50_us",
    "reserve_p99_us",
    "batch_avg",
    "replay_events_per_s",
    "recovery_s_1m",
)
TARGET_KEYS = {"events_per_s", "reserve_p99_ms", "replay_events_per_s", "recovery_s_1m"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One quick run of the benchmark, shared by the checks below."""
    scratch = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", "--data-dir", str(scratch)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == []  # the scratch data directory is removed afterwards
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.slow
def test_headline_numbers_are_measured(report: dict[str, object]) -> None:
    """Every headline figure is present and a non-negative number."""
    for key in NUMBERS:
        value = report[key]
        assert isinstance(value, int | float), key
        assert not isinstance(value, bool), key
        assert value >= 0, key
    assert report["durability"] == "fsync"


@pytest.mark.slow
def test_ceiling_is_measured_on_the_same_run(report: dict[str, object]) -> None:
    """The disk's own limits come with the engine's numbers."""
    ceiling = report["ceiling"]
    assert isinstance(ceiling, dict)
    for key in ("fsync_per_s", "group_commit_records_per_s"):
        assert isinstance(ceiling[key], int), key
        assert ceiling[key] > 0, key


@pytest.mark.slow
def test_targets_and_verdicts(report: dict[str, object]) -> None:
    """Targets are stated and each has a boolean verdict."""
    targets, met = report["targets"], report["meets_targets"]
    assert isinstance(targets, dict)
    assert isinstance(met, dict)
    assert TARGET_KEYS == set(targets) == set(met)
    assert all(isinstance(value, bool) for value in met.values())


@pytest.mark.slow
def test_machine_facts_and_command(report: dict[str, object]) -> None:
    """The report says where and how it was measured."""
    facts = report["machine"]
    assert isinstance(facts, dict)
    assert isinstance(facts["cpu_count"], int)
    assert facts["cpu_count"] > 0
    assert isinstance(facts["python"], str)
    assert facts["python"].count(".") == 2
    idle = facts["cpuidle"]  # None where the kernel exposes no cpuidle (not Linux, some containers)
    assert idle is None or {"driver", "governor", "guest_halt_poll_ns"} == set(idle)
    command = report["command"]
    assert isinstance(command, str)
    assert "--quick" in command


@pytest.mark.slow
def test_recovery_replays_the_whole_log_without_snapshots(report: dict[str, object]) -> None:
    """With every snapshot removed, startup replays exactly the events that were built."""
    recovery = report["recovery"]
    assert isinstance(recovery, dict)
    assert recovery["events"] == recovery["no_snapshot"]["replayed_events"] == report["recovery_events"]
    assert recovery["no_snapshot"]["from_snapshot"] == 0


@pytest.mark.slow
def test_redis_mode_reports_projection_figures(tmp_path: Path) -> None:
    """With --redis the load runs with the projection on and reports its lag and a Redis ceiling."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--redis",
            "--json",
            "--only",
            "ceiling",
            "--only",
            "load",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    result = json.loads(done.stdout)
    for key in ("projection_lag_ms_max", "projected_events_per_s"):
        assert isinstance(result[key], int), key
    assert isinstance(result["ceiling"]["redis_evalsha_per_s"], int)
    assert {"events_per_s": 30_000, "projection_lag_ms_max": 1_000}.items() <= result["targets"].items()


@pytest.mark.slow
def test_the_callers_sweep_reports_cpu_per_event_at_each_concurrency(tmp_path: Path) -> None:
    """--callers runs the load at each concurrency and reports CPU per event and the 16/128 ratio with its target."""
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", "--only", "ceiling", "--callers", "1,16,128"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    points = report["callers"]
    assert [1, 16, 128] == [point["concurrency"] for point in points]
    assert all(point["process_cpu_us_per_event"] > 0 for point in points)
    ratio = points[1]["process_cpu_us_per_event"] / points[2]["process_cpu_us_per_event"]
    assert round(ratio, 3) == report["callers_cpu_ratio_16_over_128"]
    verdict = report["meets_targets"]["callers_cpu_ratio_16_over_128_max"]
    assert (2.0, ratio <= 2.0) == (report["targets"]["callers_cpu_ratio_16_over_128_max"], verdict)
