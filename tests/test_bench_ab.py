"""``bench/ab.py``: arms parse, runs alternate and are kept, the summary reads every run (never asserts speed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from bench.ab import Arm, parse_args, parse_arm, summarize

import tollway
from tests.bench_run import bench_report

RUN_TIMEOUT_S = 90


@pytest.mark.parametrize(
    ("text", "arm"),
    [
        ("base=", Arm("base", ())),
        ("nice0=--setting redis_nice=0", Arm("nice0", ("--setting", "redis_nice=0"))),
        (
            "gap.4=--setting 'wal_sync_gap_ms=4'  --curve 0.5",
            Arm("gap.4", ("--setting", "wal_sync_gap_ms=4", "--curve", "0.5")),
        ),
    ],
)
def test_an_arm_is_a_name_and_shell_split_arguments(text: str, arm: Arm) -> None:
    assert arm == parse_arm(text)


@pytest.mark.parametrize("text", ["base", "=--quick", "two words=--quick", "q=--setting 'unclosed"])
def test_a_malformed_arm_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_arm(text)


def test_arguments_after_the_separator_go_to_every_run() -> None:
    args = parse_args(["--arm", "a=", "--arm", "b=--quick", "--runs", "2", "--", "--curve", "0.5", "--json"])
    assert (["--curve", "0.5"], 2, ["a", "b"]) == (args.common, args.runs, [arm.name for arm in args.arm])


def test_an_arm_runs_on_another_src_only_when_that_src_holds_tollway(tmp_path: Path) -> None:
    """``--src NAME=DIR`` names an arm and a directory with a tollway package; anything else is refused."""
    src = Path(tollway.__file__).resolve().parent.parent
    args = parse_args(["--arm", "before=", "--arm", "now=", "--src", f"before={src}"])
    assert {"before": str(src)} == args.srcs
    for wrong in (f"other={src}", f"before={tmp_path}", str(src)):
        with pytest.raises(SystemExit):
            parse_args(["--arm", "before=", "--arm", "now=", "--src", wrong])


def _report(pairs: float, p99: float, curve_p99: float) -> dict[str, Any]:
    return {
        "pairs_per_s": pairs,
        "reserve_p99_ms": p99,
        "open_loop": {"server_cpu_busy": 0.9, "server_children_cpu_busy": 0.05},
        "open_loop_curve": [{"share": 0.5, "reserve_p99_ms": curve_p99}],
    }


def test_the_summary_gives_every_run_and_the_median() -> None:
    """A failed run shows as None and is left out of the median; curve phases get figures of their own."""
    summary = summarize({"a": [_report(100, 5, 2), None, _report(300, 9, 4)], "b": [_report(200, 7, 3)]})
    a, b = summary["a"], summary["b"]
    assert {"values": [100, None, 300], "median": 200} == a["pairs_per_s"]
    assert {"values": [0.95, None, 0.95], "median": 0.95} == a["open_loop.core_busy"]
    assert {"values": [2, None, 4], "median": 3} == a["curve.0.5.reserve_p99_ms"]
    assert {"values": [7], "median": 7} == b["reserve_p99_ms"]
    assert {"values": [None], "median": None} == b["max_again.drift"]  # absent from the report
    assert list(a) == list(b)


@pytest.mark.slow
def test_two_arms_run_alternately_and_every_report_is_kept(tmp_path: Path) -> None:
    """One quick run per arm, end to end: both reports saved, both summarised, nothing failed."""
    out = tmp_path / "ab"
    src = str(Path(tollway.__file__).resolve().parent.parent)  # this code, given as another version's would be
    arms = ["--arm", "base=", "--arm", "gap0=--setting wal_sync_gap_ms=0", "--src", f"gap0={src}"]
    arms += ["--runs", "1", "--out", str(out)]
    common = ("--quick", "--generator", "python", "--open-connections", "12", "--data-dir", str(tmp_path))
    result = bench_report("ab.py", *arms, "--json", "--", *common, timeout_s=RUN_TIMEOUT_S, cwd=tmp_path)
    expected_arms = {
        "base": {"args": [], "src": None},
        "gap0": {"args": ["--setting", "wal_sync_gap_ms=0"], "src": src},
    }
    assert ([], expected_arms) == (
        result["failed"],
        result["arms"],
    )
    assert {"base-1.json", "base-1.err", "gap0-1.json", "gap0-1.err"} == {path.name for path in out.iterdir()}
    gap0 = json.loads((out / "gap0-1.json").read_text())
    assert "0" == gap0["server"]["settings"]["wal_sync_gap_ms"]
    for arm in ("base", "gap0"):
        [pairs] = result["summary"][arm]["pairs_per_s"]["values"]
        assert isinstance(pairs, float | int)
        assert pairs > 0
