"""Settings load from a mapping, the environment and TOML; anything unknown or invalid is an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tollway.config import Durability, PumpMode, Settings, load_settings, settings_from_environment
from tollway.core.commands import OverrunPolicy
from tollway.core.errors import ConfigError


def test_defaults_match_the_spec() -> None:
    """The seed constants of the SPEC are the defaults."""
    settings = Settings()
    assert (300, 1_000_000_000, 500, 50, 100, Durability.FSYNC, 64 << 20) == (
        settings.reserve_ttl_s,
        settings.max_request_cost_micro,
        settings.max_pending_risk_cu,
        settings.max_pending_reconciliation,
        settings.credit_units_per_usd,
        settings.durability,
        settings.segment_bytes,
    )
    assert not settings.policy().finalize


def test_strings_are_converted_by_field_type() -> None:
    """Environment-style strings become ints, enums and paths."""
    settings = load_settings(
        {
            "segment_bytes": "8192",
            "durability": "none",
            "overrun_policy": "cap",
            "data_dir": "d",
            "settlement_url": "http://s",
        }
    )
    assert (8192, Durability.NONE, OverrunPolicy.CAP, Path("d")) == (
        settings.segment_bytes,
        settings.durability,
        settings.overrun_policy,
        settings.data_dir,
    )
    assert settings.policy().finalize


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"segmnt_bytes": "1"}, "unknown setting(s): segmnt_bytes"),
        ({"segment_bytes": "lots"}, "invalid value for segment_bytes"),
        ({"segment_bytes": 2 << 30}, "segment_bytes must be between"),
        ({"durability": "off"}, "invalid value for durability: 'off' (one of fsync, none)"),
        ({"overrun_policy": "charge"}, "invalid value for overrun_policy: 'charge' (one of debit_available, cap)"),
        ({"reserve_ttl_s": 4000}, "reserve_ttl_s must be between 1 and 3600"),
        ({"wal_sync_gap_ms": 101}, "wal_sync_gap_ms must be between 0 and 100"),
        ({"redis_nice": -1}, "redis_nice must be between 0 and 19"),
        ({"redis_nice": 20}, "redis_nice must be between 0 and 19"),
        ({"sweep_batch_max": True}, "expected an integer"),
        ({"redis_url": "localhost:6379"}, "redis_url must be a URL starting with redis://, rediss://, unix://"),
        ({"redis_url": "redis://"}, "redis_url must be a URL starting with"),
        ({"settlement_url": "settlement.internal"}, "settlement_url must be a URL starting with http://, https://"),
    ],
)
def test_bad_settings_are_startup_errors(mapping: dict[str, object], message: str) -> None:
    """An unknown name or a bad value raises ConfigError with a message naming it."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(mapping)


def test_environment_then_toml_then_overrides(tmp_path: Path) -> None:
    """TOML is read first, TOLLWAY_* variables override it, explicit overrides win."""
    toml = tmp_path / "tollway.toml"
    toml.write_text('sweep_batch_max = 10\nreserve_ttl_s = 60\ndata_dir = "from-toml"\n')
    env = {"TOLLWAY_RESERVE_TTL_S": "120", "OTHER": "x", "TOLLWAY_GUARD_BYPASS": "false"}
    settings = settings_from_environment(env, toml, data_dir=Path("explicit"))
    assert (10, 120, Path("explicit")) == (settings.sweep_batch_max, settings.reserve_ttl_s, settings.data_dir)


def test_unknown_environment_variable_is_an_error() -> None:
    """A misspelt TOLLWAY_ variable is not silently ignored."""
    with pytest.raises(ConfigError, match="unknown setting"):
        settings_from_environment({"TOLLWAY_DURABILTY": "none"})


def test_unreadable_toml_is_an_error(tmp_path: Path) -> None:
    """A configuration file that does not parse stops startup."""
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        settings_from_environment({}, bad)


def test_replace_validates() -> None:
    """A copy with changes is validated like any other."""
    with pytest.raises(ConfigError):
        Settings().replace(snapshots_kept=0)


@pytest.mark.parametrize(
    ("mode", "cpus", "expected"),
    [
        ("auto", {0, 1}, True),
        ("auto", {0}, False),  # pinned to one CPU: the pump would only add work
        ("on", {0}, True),
        ("off", {0, 1}, False),
    ],
)
def test_projection_pump_auto_follows_the_usable_cpus(
    monkeypatch: pytest.MonkeyPatch, mode: str, cpus: set[int], expected: bool
) -> None:
    """projection_pump: on and off are obeyed; auto uses the pump only with more than one usable CPU."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: cpus)
    settings = load_settings({"projection_pump": mode})
    assert PumpMode(mode) is settings.projection_pump
    assert expected is settings.uses_pump
