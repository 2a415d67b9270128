"""Metrics and logs (SPEC §12): a real engine feeds Prometheus metrics and one JSON line per transition."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import shutil
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tollway import Engine, Settings
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.errors import ConfigError
from tollway.core.guard import CheckResult, CheckStatus, Guard, GuardState
from tollway.housekeeping import archive_once
from tollway.logs import HANDLER_NAME, configure_logging, direct_json_lines, parse_level, structlog_alert
from tollway.metrics import CONTENT_TYPE, TRANSITION_EVENT, TRANSITION_LOG_KEYS, Metrics, MetricsObserver
from tollway.redis.keys import Keys
from tollway.redis.projector import Projector
from tollway.redis.queue import FinalizeQueue
from tollway.redis.server import EmbeddedRedis
from tollway.testing import FakeClock

SPEC_NAMES = (
    "billing_state_transitions_total",
    "billing_reserve_duration_seconds",
    "billing_commit_duration_seconds",
    "billing_finalize_duration_seconds",
    "billing_pending_reconciliation_count",
    "billing_circuit_breaker_state",
    "wal_replay_duration_seconds",
    "wal_fsync_duration_seconds",
    "wal_batch_records",
    "wal_appended_records_total",
    "wal_appended_bytes_total",
    "wal_durable_sequence",
    "billing_projection_lag_events",
    "billing_projection_lag_seconds",
    "billing_finalize_queue_depth",
    "billing_rejections_total",
    "billing_guard_state",
    "billing_invariant_violations_total",
    "billing_uncollected_overrun_micro_total",
    "billing_alerts_total",
)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> tuple[set[str], Samples]:
    """Parse ``render()`` as Prometheus does: every sample and family name, and every sample's value."""
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics() -> Metrics:
    """A metrics set in a registry of its own."""
    return Metrics()


@pytest.fixture
def transition_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[MutableMapping[str, Any]]]:
    """Structured log entries emitted while the test runs, with transition logging enabled."""
    caplog.set_level(logging.INFO, logger="tollway.transitions")
    with capture_logs() as captured:
        yield captured


async def drive(engine: Engine) -> None:
    """Mint; three holds; commit one with an overrun; release one; a direct charge; one refused hold."""
    await engine.execute(cmd.Credit("acct", "m1", CreditKind.MINT, 3_500))
    held = [await engine.execute(cmd.Reserve("acct", f"r{i}", 1_000, correlation_id=f"trace-{i}")) for i in range(3)]
    first, second, _ = (result.entry.billing_entry_id for result in held if isinstance(result, EntryResult))
    await engine.execute(cmd.Commit(first, 2_000))  # 500 available, so 500 of the 1,000 overrun is uncollected
    await engine.execute(cmd.Release(second, "user_cancel"))
    await engine.execute(cmd.Charge("acct", "fee-1", 100))
    await engine.execute(cmd.Reserve("acct", "too-big", 1_000_000))


async def test_every_spec_metric_is_exposed(settings: Settings, clock: FakeClock, metrics: Metrics) -> None:
    """A scrape after real traffic has every SPEC §12 name, in the Prometheus text format."""
    async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(metrics)) as engine:
        await drive(engine)
        await metrics.collect_from(engine=engine, guard=Guard(GuardState.READY))
    names, _ = scrape(metrics)
    assert [] == [name for name in SPEC_NAMES if name not in names]
    assert CONTENT_TYPE.startswith("text/plain")


async def test_counters_match_the_traffic(settings: Settings, clock: FakeClock, metrics: Metrics) -> None:
    """Transition, rejection, overrun, duration and WAL counters equal what the traffic did."""
    async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(metrics)) as engine:
        await drive(engine)
        await metrics.collect_from(engine=engine)
        durable = engine.durable_sequence
    _, s = scrape(metrics)
    transitions = {
        (labels[0][1], labels[1][1]): count
        for (name, labels), count in s.items()
        if name == "billing_state_transitions_total" and count
    }
    expected = {("IDLE", "RESERVE_HELD"): 3, ("RESERVE_HELD", "COMMITTED"): 1, ("RESERVE_HELD", "RELEASED"): 1}
    assert {**expected, ("IDLE", "COMMITTED"): 1} == transitions
    assert 1 == value(s, "billing_rejections_total", reason="insufficient_funds")
    assert 500 == value(s, "billing_uncollected_overrun_micro_total")
    assert (3, 1) == (
        value(s, "billing_reserve_duration_seconds_count"),
        value(s, "billing_commit_duration_seconds_count"),
    )
    assert 1 == value(s, "billing_command_duration_seconds_count", command="Release")
    assert (durable, durable) == (value(s, "wal_appended_records_total"), value(s, "wal_durable_sequence"))


async def test_replay_duration_is_recorded_at_startup(settings: Settings, clock: FakeClock) -> None:
    """Reopening a data directory reports the events replayed and the replay time."""
    async with Engine.open(settings=settings, clock=clock) as engine:
        await engine.execute(cmd.Credit("acct", "m1", CreditKind.MINT, 10))
    (settings.snapshot_dir).mkdir(exist_ok=True)
    for snapshot in settings.snapshot_dir.iterdir():
        snapshot.unlink()  # force a replay from the WAL
    metrics = Metrics()
    async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(metrics)):
        pass
    _, s = scrape(metrics)
    assert 1 == value(s, "wal_replayed_events")
    assert True is (value(s, "wal_replay_duration_seconds") > 0)


async def test_one_log_line_per_transition_with_exactly_the_required_keys(
    settings: Settings, clock: FakeClock, metrics: Metrics, transition_logs: list[MutableMapping[str, Any]]
) -> None:
    """Six transitions, six lines; each has exactly the seven SPEC keys besides the event name and level."""
    async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(metrics)) as engine:
        await drive(engine)
    lines = [entry for entry in transition_logs if entry["event"] == TRANSITION_EVENT]
    assert 6 == len(lines)
    assert [] == [line for line in lines if set(line) != {*TRANSITION_LOG_KEYS, "event", "log_level"}]
    by_state = {(line["from_state"], line["to_state"]): line for line in lines}
    hold, commit = by_state[("IDLE", "RESERVE_HELD")], by_state[("RESERVE_HELD", "COMMITTED")]
    assert (1_000, 1_500, "trace-0") == (hold["cost_micro_usd"], commit["cost_micro_usd"], commit["correlation_id"])
    assert list(range(2, 8)) == sorted(line["wal_sequence"] for line in lines)


@pytest.fixture
def json_logging() -> Iterator[io.StringIO]:
    """configure_logging(json=True) to a StringIO; the test body sets pytest's own handlers aside (alone())."""
    stream = io.StringIO()
    saved = structlog.get_config()
    root = logging.getLogger()
    level = root.level
    try:
        configure_logging("info", json=True, stream=stream)
        yield stream
    finally:
        for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
            root.removeHandler(handler)
        root.setLevel(level)
        structlog.configure(**saved)


async def test_json_lines_on_the_configured_stream(
    settings: Settings, clock: FakeClock, metrics: Metrics, json_logging: io.StringIO
) -> None:
    """With configure_logging(json=True), each transition is one parseable JSON line carrying the keys."""
    async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(metrics)) as engine:
        await drive(engine)
    records = [json.loads(line) for line in json_logging.getvalue().splitlines()]
    transitions = [record for record in records if record.get("event") == TRANSITION_EVENT]
    assert 6 == len(transitions)
    envelope = {"event", "level", "logger", "timestamp"}
    assert [] == [record for record in transitions if set(record) != {*TRANSITION_LOG_KEYS, *envelope}]


async def test_disabled_logger_writes_no_lines(
    settings: Settings, clock: FakeClock, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """When tollway.transitions is not enabled for INFO, no transition line is built at all."""
    caplog.set_level(logging.WARNING, logger="tollway.transitions")
    with capture_logs() as captured:
        async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(metrics)) as engine:
            await drive(engine)
    assert [] == captured


def test_two_metrics_sets_live_side_by_side() -> None:
    """Each Metrics has its own registry, so two engines in one process do not collide."""
    first, second = Metrics(), Metrics()
    first.rejections.labels("insufficient_funds").inc()
    assert (1, 0) == (
        value(scrape(first)[1], "billing_rejections_total", reason="insufficient_funds"),
        value(scrape(second)[1], "billing_rejections_total", reason="insufficient_funds"),
    )


def test_guard_state_is_one_hot_and_violations_count_per_check(metrics: Metrics) -> None:
    """The guard gauge marks exactly the current state; each violated check run counts once."""
    guard = Guard(GuardState.DEGRADED, recovery_stopped=True)
    results = [
        CheckResult("ledger_zero_sum", CheckStatus.VIOLATED, ("a", "b")),
        CheckResult("cost_non_negative", CheckStatus.PASSED),
    ]
    metrics.guard_checked(guard, results)
    _, s = scrape(metrics)
    one_hot = {state.value: value(s, "billing_guard_state", state=state.value) for state in GuardState}
    assert {"uninitialized": 0, "ready": 0, "degraded": 1, "bypassed": 0} == one_hot
    assert (1, 0, 1) == (
        value(s, "billing_invariant_violations_total", check="ledger_zero_sum"),
        value(s, "billing_invariant_violations_total", check="cost_non_negative"),
        value(s, "billing_guard_recovery_stopped"),
    )


async def test_projection_lag_and_queue_depths_are_pulled_at_scrape(
    tmp_path: Path, clock: FakeClock, metrics: Metrics, redis_server: EmbeddedRedis
) -> None:
    """collect_from reads the projector's lag and the finalize queue's depths from a real Redis."""
    settings = Settings(data_dir=tmp_path / "data", settlement_url="http://settlement.invalid")
    client = aioredis.Redis.from_url(redis_server.url)
    keys = Keys("tw", "m")
    async with Engine.open(settings=settings, clock=clock) as engine:
        projector = Projector(engine, client, keys)
        queue = FinalizeQueue(client, keys, "consumer-1")
        await drive(engine)
        await metrics.collect_from(engine=engine, projector=projector, queue=queue)
        _, before = scrape(metrics)
        await projector.sync()
        await metrics.collect_from(projector=projector, queue=queue)
        _, after = scrape(metrics)
        durable = engine.durable_sequence
    await client.aclose()
    assert (durable, 0) == (
        value(before, "billing_projection_lag_events"),
        value(after, "billing_projection_lag_events"),
    )
    assert {"on": 0, "off": 1, "failed": 0} == {
        state: value(after, "billing_projection_pump", state=state) for state in ("on", "off", "failed")
    }
    assert 2 == value(after, "billing_finalize_queue_depth", queue="stream")  # the overrun commit and the fee


async def test_unreachable_redis_does_not_break_a_scrape(
    settings: Settings, clock: FakeClock, metrics: Metrics, redis_server: EmbeddedRedis
) -> None:
    """With Redis gone the queue depths keep their last values and collect_from returns normally."""
    client = aioredis.Redis.from_url(redis_server.url)
    await redis_server.stop()
    metrics.queue_depth.labels("poison").set(3)
    await metrics.collect_from(queue=FinalizeQueue(client, Keys("tw", "x"), "c"))
    await client.aclose()
    assert 3 == value(scrape(metrics)[1], "billing_finalize_queue_depth", queue="poison")


def test_alert_hook_logs_one_line_and_counts_by_kind(metrics: Metrics) -> None:
    """The structlog alert sink writes one billing_alert line and bumps billing_alerts_total{kind}."""
    alert = structlog_alert(metrics)
    with capture_logs() as captured:
        alert("finalize_poison", {"billing_entry_id": "e1", "event": "clash"})
    assert [
        {
            "event": "billing_alert",
            "log_level": "error",
            "alert_kind": "finalize_poison",
            "billing_entry_id": "e1",
            "detail_event": "clash",
        }
    ] == captured
    assert 1 == value(scrape(metrics)[1], "billing_alerts_total", kind="finalize_poison")


def test_log_levels_parse_strictly() -> None:
    """Level names parse in any case; an unknown name is a configuration error."""
    assert (logging.DEBUG, logging.WARNING, 15) == (parse_level("debug"), parse_level("WARNING"), parse_level(15))
    with pytest.raises(ConfigError):
        parse_level("loud")


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """The handler of configure_logging as the root's only one (pytest adds its own for each phase)."""
    root = logging.getLogger()
    others = [h for h in root.handlers if h.get_name() != HANDLER_NAME]
    for handler in others:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            root.addHandler(handler)


async def test_direct_json_lines_write_what_the_structlog_route_writes(
    settings: Settings, clock: FakeClock, metrics: Metrics, json_logging: io.StringIO
) -> None:
    """The batch fast lane writes the same six lines, keys and values as logging each through structlog."""
    calls: list[bool] = []

    def spy(logger_name: str, event: str, lines: list[dict[str, object]]) -> bool:
        calls.append(direct_json_lines(logger_name, event, lines))
        return calls[-1]

    with alone():
        async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(metrics, json_lines=spy)) as e:
            await drive(e)
    fast = [json.loads(line) for line in json_logging.getvalue().splitlines()]
    json_logging.seek(0)
    json_logging.truncate()
    shutil.rmtree(settings.data_dir)  # the same commands from scratch: the same sequences and amounts
    with alone():
        async with Engine.open(settings=settings, clock=clock, observer=MetricsObserver(Metrics())) as engine:
            await drive(engine)
    slow = [json.loads(line) for line in json_logging.getvalue().splitlines()]

    def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        transitions = [r for r in records if r.get("event") == TRANSITION_EVENT]
        stamps = [r.pop("timestamp") for r in transitions]
        assert all(s.endswith("Z") and datetime.datetime.fromisoformat(s) for s in stamps)
        return [{k: v for k, v in r.items() if k != "billing_entry_id"} for r in transitions]

    fast_lines, slow_lines = comparable(fast), comparable(slow)
    assert calls
    assert all(calls)
    assert 6 == len(fast_lines)
    assert slow_lines == fast_lines


def test_direct_json_lines_decline_when_anything_else_listens(json_logging: io.StringIO) -> None:
    """Another handler, a filter, bound context, reconfigured structlog or console output: the caller logs."""
    line = [{"billing_entry_id": "x", "wal_sequence": 1}]
    assert not direct_json_lines("tollway.transitions", TRANSITION_EVENT, line)  # pytest's capture listens
    with alone():
        _declines_when_anything_else_listens(json_logging, line)


def _declines_when_anything_else_listens(json_logging: io.StringIO, line: list[dict[str, object]]) -> None:
    assert direct_json_lines("tollway.transitions", TRANSITION_EVENT, line)
    assert json.loads(json_logging.getvalue())["wal_sequence"] == 1
    extra = logging.NullHandler()
    logging.getLogger("tollway").addHandler(extra)
    try:
        assert not direct_json_lines("tollway.transitions", TRANSITION_EVENT, line)
    finally:
        logging.getLogger("tollway").removeHandler(extra)
    noise = logging.Filter("nothing")
    logging.getLogger().addFilter(noise)
    try:
        assert not direct_json_lines("tollway.transitions", TRANSITION_EVENT, line)
    finally:
        logging.getLogger().removeFilter(noise)
    with structlog.contextvars.bound_contextvars(request_id="r1"):
        assert not direct_json_lines("tollway.transitions", TRANSITION_EVENT, line)
    with capture_logs():
        assert not direct_json_lines("tollway.transitions", TRANSITION_EVENT, line)
    configure_logging("info", json=False, stream=json_logging)
    assert not direct_json_lines("tollway.transitions", TRANSITION_EVENT, line)


async def test_entries_kept_and_archived_are_gauged(settings: Settings, clock: FakeClock, metrics: Metrics) -> None:
    """``billing_entries`` counts what the engine keeps, ``billing_entries_archived`` what retention dropped."""
    async with Engine.open(settings=settings.replace(entry_retention_hours=24), clock=clock) as engine:
        await drive(engine)
        await metrics.collect_from(engine=engine)
        _, before = scrape(metrics)
        kept = len(engine.state.entries) + len(engine.state.settled)
        clock.advance(25 * 3_600_000)
        archived = (await archive_once(engine)).entries
        await metrics.collect_from(engine=engine)
    _, after = scrape(metrics)
    assert (kept, 0) == (value(before, "billing_entries"), value(before, "billing_entries_archived"))
    assert archived > 0
    assert (kept - archived, archived) == (value(after, "billing_entries"), value(after, "billing_entries_archived"))


async def test_money_totals_and_the_reconciliation_limit_are_gauged(
    settings: Settings, clock: FakeClock, metrics: Metrics
) -> None:
    """``billing_balance_micro`` sums every account's balances; the reconciliation cap is exported beside its count."""
    async with Engine.open(settings=settings, clock=clock) as engine:
        await drive(engine)
        await engine.execute(cmd.Credit("other", "m2", CreditKind.MINT, 700))
        await metrics.collect_from(engine=engine)
        accounts = [engine.balance(name) for name in ("acct", "other")]
    _, s = scrape(metrics)
    totals = {name: value(s, "billing_balance_micro", balance=name) for name in ("available", "held", "charged")}
    expected = {
        "available": sum(a.available_micro for a in accounts),
        "held": sum(a.held_micro for a in accounts),
        "charged": sum(a.charged_micro for a in accounts),
    }
    assert ({"available": 1_600, "held": 1_000, "charged": 1_600}, expected) == (totals, expected)
    assert 50 == value(s, "billing_pending_reconciliation_limit")
