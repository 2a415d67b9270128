"""The HTTP benchmark runs end to end in quick mode and reports every key. Performance is never asserted.

It runs twice: with the default load generator (wrk when installed) and with the Python one it
falls back to, so both paths keep working whichever the machine has.
"""

from __future__ import annotations

import pytest

from tests.bench_run import bench_report, run_bench

RUN_TIMEOUT_S = 60

NUMBERS = ("pairs_per_s", "billing_requests_per_s", "reserve_p50_ms", "reserve_p99_ms", "ratio")
TARGET_KEYS = {"billing_ratio_min", "reserve_p99_ms_max_at_80pct", "reserve_p99_ms_max_at_50pct"}


@pytest.fixture(scope="module", params=["auto", "python"])
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One quick run of the benchmark per load generator, shared by the checks below."""
    scratch = tmp_path_factory.mktemp("bench-http")
    python_only = ["--setting", "wal_sync_gap_ms=0", "--open-connections", "12"] if request.param == "python" else []
    result = bench_report(
        "http.py",
        *("--quick", "--json", "--data-dir", str(scratch), "--generator", request.param, "--curve", "0.5"),
        *python_only,
        timeout_s=RUN_TIMEOUT_S,
    )
    assert [] == list(scratch.iterdir())  # the scratch data directory is removed afterwards
    return result


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.slow
def test_headline_numbers_are_measured(report: dict[str, object]) -> None:
    """Every headline figure is a number."""
    assert dict.fromkeys(NUMBERS, True) == {key: _is_number(report[key]) for key in NUMBERS}


@pytest.mark.slow
def test_the_bare_ceiling_is_measured_in_the_same_run(report: dict[str, object]) -> None:
    """The no-op endpoint's rate comes with the billing figures."""
    ceiling = report["ceiling"]
    assert isinstance(ceiling, dict)
    assert (True, "GET /healthz") == (_is_number(ceiling["bare_requests_per_s"]), ceiling["endpoint"])


@pytest.mark.slow
def test_the_ratio_is_to_a_raw_asgi_hello_on_the_same_stack(report: dict[str, object]) -> None:
    """The headline ratio divides billing requests by the raw ASGI hello; the /healthz ratio is the second figure."""
    ceiling, billing = report["ceiling"], report["billing_requests_per_s"]
    assert isinstance(ceiling, dict)
    assert isinstance(billing, float)
    hello, healthz = ceiling["asgi_hello_requests_per_s"], ceiling["bare_requests_per_s"]
    assert (round(billing / hello, 3), round(billing / healthz, 3)) == (report["ratio"], report["ratio_vs_healthz"])
    assert _is_number(ceiling["asgi_hello"]["server_cpu_us_per_request"])


@pytest.mark.slow
def test_the_machine_probes_come_with_the_figures(report: dict[str, object]) -> None:
    """How late the server's core wakes, how much more work costs on it after idling, and how evenly it runs."""
    ceiling = report["ceiling"]
    assert isinstance(ceiling, dict)
    ratios = ceiling["idle_cost_ratio"]
    assert ["0.5ms", "1ms", "3ms", "10ms"] == list(ratios)
    assert all(_is_number(value) and value > 0 for value in ratios.values())
    assert _is_number(ceiling["idle_cost_work_us"])
    assert ceiling["idle_cost_work_us"] > 0
    assert _is_number(ceiling["wakeup_p99_ms"])
    assert ceiling["idle_cost_cpu"] == ceiling["wakeup_cpu"] == ceiling["slow_cpu"]
    assert 0 <= ceiling["slow_share"] <= 1
    assert ceiling["slow_worst"] >= 1  # the slowest window over the median one
    assert ceiling["slow_windows"] > 0


@pytest.mark.slow
def test_targets_and_verdicts(report: dict[str, object]) -> None:
    """Every target is stated with a verdict: a latency verdict is None exactly when its phase's generator lagged."""
    targets, met = report["targets"], report["meets_targets"]
    assert isinstance(targets, dict)
    assert isinstance(met, dict)
    assert (TARGET_KEYS, TARGET_KEYS) == (set(targets), set(met))
    assert isinstance(met["billing_ratio_min"], bool)
    opened, curve = report["open_loop"], report["open_loop_curve"]
    assert isinstance(opened, dict)
    assert isinstance(curve, list)
    for verdict, phase in (
        (met["reserve_p99_ms_max_at_80pct"], opened),
        (met["reserve_p99_ms_max_at_50pct"], curve[0]),
    ):
        assert (verdict is None) == (not phase["valid"])


@pytest.mark.slow
def test_open_loop_and_generator_are_described(report: dict[str, object]) -> None:
    """The latency phase says its rate and counts; the report names the load generators."""
    opened, generator = report["open_loop"], report["generator"]
    assert isinstance(opened, dict)
    assert isinstance(generator, dict)
    assert all(_is_number(opened[key]) for key in ("rate_pairs_per_s", "scheduled", "completed"))
    lag = opened["generator_lag_p99_ms"]
    assert (True, True) == (lag is None or _is_number(lag), isinstance(opened["valid"], bool))
    assert opened["valid"] == (lag is None or lag <= 1.0)
    assert generator["closed_loop"] in ("wrk", "python")


@pytest.mark.slow
def test_machine_facts_and_command(report: dict[str, object]) -> None:
    """The report says where and how it was measured, and the server stopped cleanly."""
    facts, server = report["machine"], report["server"]
    assert isinstance(facts, dict)
    assert isinstance(server, dict)
    assert (True, True, True) == (
        isinstance(facts["cpu_count"], int),
        isinstance(facts["pinned"], bool),
        isinstance(facts["python"], str),
    )
    assert 0 == server["exit_code"]
    command = report["command"]
    assert isinstance(command, str)
    assert "--quick" in command


@pytest.mark.slow
def test_the_open_loop_curve_has_each_share_asked_for(report: dict[str, object]) -> None:
    """--curve 0.5 adds one more open-loop phase, reported with its rate, latency and CPU per pair."""
    curve = report["open_loop_curve"]
    assert isinstance(curve, list)
    assert [0.5] == [point["share"] for point in curve]
    assert all(_is_number(curve[0][key]) for key in ("rate_pairs_per_s", "reserve_p99_ms", "server_cpu_us_per_pair"))


@pytest.mark.slow
def test_the_maximum_is_measured_again_after_the_open_loop(report: dict[str, object]) -> None:
    """The closed-loop maximum is measured a second time, with its drift and the open loop's share of it."""
    again = report["max_again"]
    assert isinstance(again, dict)
    assert all(_is_number(again[key]) for key in ("pairs_per_s", "drift", "open_loop_share_of_it"))
    pairs = report["pairs_per_s"]
    assert isinstance(pairs, float)
    assert again["drift"] == pytest.approx(again["pairs_per_s"] / pairs - 1, abs=0.001)


def test_server_settings_and_open_connections_are_passed_and_reported(report: dict[str, object]) -> None:
    """--setting and --open-connections reach the server and the open loop, with wrk or without it."""
    server, generator, options, opened = report["server"], report["generator"], report["options"], report["open_loop"]
    assert isinstance(server, dict)
    assert isinstance(generator, dict)
    assert isinstance(options, dict)
    assert isinstance(opened, dict)
    python = options["generator"] == "python"  # the run given the python-only options (see report())
    assert ({"wal_sync_gap_ms": "0"} if python else {}) == server["settings"]
    assert (12 if python else options["concurrency"]) == options["open_connections"] == opened["connections"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [("nope=1", "unknown setting(s): nope"), ("wal_sync_gap_ms=500", "must be between 0 and 100"), ("x", "NAME=VALUE")],
)
def test_a_bad_server_setting_is_refused_before_anything_starts(setting: str, message: str) -> None:
    done = run_bench("http.py", "--setting", setting, timeout_s=30)
    assert 2 == done.returncode
    assert message in done.stderr
