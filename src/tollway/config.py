"""Settings: one frozen record, loaded from a mapping, validated at startup.

The composition roots (the CLI and the ASGI app factory) build the mapping from environment
variables ``TOLLWAY_<NAME>`` and an optional TOML file; tests pass a dict. Values from the
environment arrive as strings and are converted by each field's type. An unknown name or an
invalid value is a :class:`~tollway.core.errors.ConfigError` — never a silent default.

Every limit the engine enforces is a named setting here, with its default and its bound.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tollway.core.commands import (
    MAX_PENDING_RECONCILIATION,
    MAX_PENDING_RISK_LIMIT_CU,
    MAX_STORED_RESPONSE_BYTES,
    RESERVE_TTL_SECONDS,
    OverrunPolicy,
    Policy,
)
from tollway.core.errors import ConfigError
from tollway.core.money import DEFAULT_CREDIT_UNITS_PER_USD, INT64_MAX, MAX_REQUEST_COST_MICRO, PPM
from tollway.wal.log import DEFAULT_SEGMENT_BYTES, MAX_WAL_FILE_BYTES

ENV_PREFIX: Final = "TOLLWAY_"
MIN_RETENTION_HOURS: Final = 24
"""Shortest entry retention (0 aside): idempotency records must survive at least a day (SPEC §6)."""
WAL_SYNC_GAP_MS_MAX: Final = 100
"""Longest ``wal_sync_gap_ms``: every durable answer can wait this long for its sync to start."""
REDIS_NICE: Final = 10
"""Default ``redis_nice``: on a shared core the embedded Redis gets about a tenth of the CPU the
service gets while both want it (Linux weights nice 10 at 110 against 1024 for nice 0)."""
REDIS_NICE_MAX: Final = 19


class Durability(enum.Enum):
    """How the WAL reaches disk before a command is answered."""

    FSYNC = "fsync"  # fdatasync every group-commit batch: the only production setting
    NONE = "none"  # no sync at all: tests and benchmarks only, logged loudly


class WalSyncer(enum.Enum):
    """Who calls ``fdatasync`` for a group-commit batch (see :mod:`tollway.wal.syncer`)."""

    PROCESS = "process"  # a helper process: a sync never waits for this process's GIL (default)
    THREAD = "thread"  # an I/O thread of this process: no helper, but each sync waits for the GIL


class PumpMode(enum.Enum):
    """Whether projection batches are encoded in a child process (see :mod:`tollway.redis.pump`)."""

    AUTO = "auto"  # the pump when this process may run on more than one CPU
    ON = "on"
    OFF = "off"  # in the event loop: one process fewer; on one CPU the pump only adds work


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. Field names are the setting names (lower case)."""

    data_dir: Path = Path("tollway-data")
    durability: Durability = Durability.FSYNC
    wal_syncer: WalSyncer = WalSyncer.PROCESS
    segment_bytes: int = DEFAULT_SEGMENT_BYTES  # WAL segment rotation size, ≤ 1 GiB
    snapshot_every_events: int = 250_000  # write a snapshot after this many new events
    snapshots_kept: int = 2
    batch_records_max: int = 8192  # records in one group-commit batch; callers wait beyond
    batch_bytes_max: int = 8 << 20
    wal_sync_gap_ms: int = 2  # least time between the starts of two WAL syncs (fsync); 0: back to back
    sweep_interval_ms: int = 1000  # how often the expiry sweeper runs
    sweep_batch_max: int = 1000  # holds expired per sweeper tick, at most
    entry_retention_hours: int = 168  # settled entries (and credit records) are archived this long after; 0: never
    archive_interval_s: int = 60  # how often the archiver looks for entries and credit records past the retention
    settlement_url: str | None = None  # None: standalone mode (tollway is the final ledger)
    overrun_policy: OverrunPolicy = OverrunPolicy.DEBIT_AVAILABLE
    max_request_cost_micro: int = MAX_REQUEST_COST_MICRO
    reserve_ttl_s: int = RESERVE_TTL_SECONDS
    reserve_ttl_s_max: int = 3600
    credit_units_per_usd: int = DEFAULT_CREDIT_UNITS_PER_USD
    usd_usdc_rate_ppm: int = PPM
    max_pending_risk_cu: int = MAX_PENDING_RISK_LIMIT_CU
    max_pending_reconciliation: int = MAX_PENDING_RECONCILIATION
    max_response_bytes: int = MAX_STORED_RESPONSE_BYTES
    # -- Redis (projection and finalize queue) --
    redis_url: str | None = None  # None: start a private redis-server in <data_dir>/redis
    redis_prefix: str = "tw"
    shard: str = "0"  # the hash tag of every key of this engine
    redis_memory_bytes_max: int = 1 << 30  # maxmemory of the embedded server (noeviction)
    redis_nice: int = REDIS_NICE  # the embedded server's nice value above the service's (billing first)
    projection_coalesce_ms: int = 10  # once caught up, the projector gathers this long before its next call
    projection_pump: PumpMode = PumpMode.AUTO  # encode and apply projection batches in a child process
    parity_check_interval_s: int = 60  # how often the guard compares the projection with the WAL's state; 0: never
    # -- settlement --
    settlement_timeout_ms: int = 1000
    settlement_issuer: str = "tollway"
    settlement_audience: str = "arrakis"
    settlement_tenant_id: str = "default"
    settlement_allow_hs256: bool = False  # only with an explicit secret; ES256 otherwise
    settlement_hs256_secret: str | None = None
    worker_concurrency: int = 8  # settlement calls in flight per worker
    claim_idle_ms: int = 30_000  # a delivered message idle this long is reclaimed
    replay_concurrency: int = 5  # bulk replay of dead letters
    breaker_failure_threshold: int = 5  # failures within the window that open the breaker
    breaker_window_ms: int = 60_000
    breaker_cooldown_ms: int = 30_000  # OPEN this long before one probe is let through
    breaker_probe_timeout_ms: int = 5_000  # a probe with no outcome by then counts as a failure
    # -- HTTP service --
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    http_body_bytes_max: int = 1 << 20  # larger request bodies get 413 before parsing
    auth_audience: str = "tollway"
    auth_issuer: str = "tollway"
    auth_public_key_files: str = ""  # comma-separated PEM/JWK/JWKS files; empty: the dev key
    auth_allow_hs256: bool = False  # development only
    auth_hs256_secret: str | None = None
    pricing_file: Path | None = None  # None: the shipped default price table

    def __post_init__(self) -> None:
        _check_range("segment_bytes", self.segment_bytes, 4096, MAX_WAL_FILE_BYTES)
        _check_range("snapshot_every_events", self.snapshot_every_events, 1, INT64_MAX)
        _check_range("snapshots_kept", self.snapshots_kept, 1, 100)
        _check_range("batch_records_max", self.batch_records_max, 1, 1_000_000)
        _check_range("batch_bytes_max", self.batch_bytes_max, 1 << 20, MAX_WAL_FILE_BYTES)
        _check_range("wal_sync_gap_ms", self.wal_sync_gap_ms, 0, WAL_SYNC_GAP_MS_MAX)
        _check_range("sweep_interval_ms", self.sweep_interval_ms, 1, 3_600_000)
        _check_range("sweep_batch_max", self.sweep_batch_max, 1, 1_000_000)
        if self.entry_retention_hours != 0:  # idempotency records must outlive retries: SPEC §6, >= 24 h
            _check_range("entry_retention_hours", self.entry_retention_hours, MIN_RETENTION_HOURS, 10 * 365 * 24)
        _check_range("archive_interval_s", self.archive_interval_s, 1, 86_400)
        _check_range("max_request_cost_micro", self.max_request_cost_micro, 1, INT64_MAX)
        _check_range("reserve_ttl_s_max", self.reserve_ttl_s_max, 1, 7 * 86_400)
        _check_range("reserve_ttl_s", self.reserve_ttl_s, 1, self.reserve_ttl_s_max)
        _check_range("credit_units_per_usd", self.credit_units_per_usd, 1, 1_000_000_000)
        _check_range("usd_usdc_rate_ppm", self.usd_usdc_rate_ppm, 1, 1_000_000_000)
        _check_range("max_pending_risk_cu", self.max_pending_risk_cu, 0, INT64_MAX)
        _check_range("max_pending_reconciliation", self.max_pending_reconciliation, 1, 1_000_000)
        _check_range("max_response_bytes", self.max_response_bytes, 0, 1 << 20)
        _check_range("redis_memory_bytes_max", self.redis_memory_bytes_max, 16 << 20, 1 << 40)
        _check_range("redis_nice", self.redis_nice, 0, REDIS_NICE_MAX)
        _check_range("projection_coalesce_ms", self.projection_coalesce_ms, 0, 1000)
        _check_range("parity_check_interval_s", self.parity_check_interval_s, 0, 86_400)
        _check_range("settlement_timeout_ms", self.settlement_timeout_ms, 10, 60_000)
        _check_range("worker_concurrency", self.worker_concurrency, 1, 256)
        _check_range("claim_idle_ms", self.claim_idle_ms, 10, 3_600_000)
        _check_range("replay_concurrency", self.replay_concurrency, 1, 64)
        _check_range("breaker_failure_threshold", self.breaker_failure_threshold, 1, 1000)
        _check_range("breaker_window_ms", self.breaker_window_ms, 100, 3_600_000)
        _check_range("breaker_cooldown_ms", self.breaker_cooldown_ms, 100, 3_600_000)
        _check_range("breaker_probe_timeout_ms", self.breaker_probe_timeout_ms, 100, 600_000)
        _check_range("http_port", self.http_port, 0, 65_535)
        _check_range("http_body_bytes_max", self.http_body_bytes_max, 1024, 64 << 20)
        _check_url("redis_url", self.redis_url, ("redis://", "rediss://", "unix://"))
        _check_url("settlement_url", self.settlement_url, ("http://", "https://"))
        for name in ("redis_prefix", "shard"):
            value = getattr(self, name)
            if not value or any(c in value for c in "{}: "):
                raise ConfigError(f"{name} must be non-empty, without braces, colons or spaces")

    @property
    def wal_dir(self) -> Path:
        """Where the WAL segments live."""
        return self.data_dir / "wal"

    @property
    def snapshot_dir(self) -> Path:
        """Where the snapshots live."""
        return self.data_dir / "snapshots"

    @property
    def uses_pump(self) -> bool:
        """Whether ``projection_pump`` asks for the pump on this machine (``auto``: more than one usable CPU)."""
        if self.projection_pump is PumpMode.AUTO:
            return len(os.sched_getaffinity(0)) > 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) > 1
        return self.projection_pump is PumpMode.ON

    def policy(self, *, holds_allowed: bool = True) -> Policy:
        """The decision policy these settings describe."""
        return Policy(
            finalize=self.settlement_url is not None,
            overrun_policy=self.overrun_policy,
            max_request_cost_micro=self.max_request_cost_micro,
            reserve_ttl_s=self.reserve_ttl_s,
            reserve_ttl_s_max=self.reserve_ttl_s_max,
            credit_units_per_usd=self.credit_units_per_usd,
            usd_usdc_rate_ppm=self.usd_usdc_rate_ppm,
            max_pending_risk_cu=self.max_pending_risk_cu,
            max_pending_reconciliation=self.max_pending_reconciliation,
            max_response_bytes=self.max_response_bytes,
            holds_allowed=holds_allowed,
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, validated like any other."""
        return load_settings({**_as_mapping(self), **changes})


def _check_url(name: str, value: str | None, schemes: tuple[str, ...]) -> None:
    if value is not None and not any(value.startswith(scheme) and value != scheme for scheme in schemes):
        raise ConfigError(f"{name} must be a URL starting with {', '.join(schemes)}, got {value!r}")


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")


def _as_mapping(settings: Settings) -> dict[str, Any]:
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}


_HINTS: Final = typing.get_type_hints(Settings)


def _convert(name: str, raw: object) -> object:
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):  # optional
        if raw is None or raw == "":
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    converter = _CONVERTERS.get(hint)
    if converter is None and isinstance(hint, type) and issubclass(hint, enum.Enum):
        converter = _enum_of(hint)
    if converter is None:
        raise ConfigError(f"setting {name} has an unsupported type")  # a bug in this module
    return converter(name, raw)


def _integer(name: str, raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ConfigError(f"invalid value for {name}: {raw!r} (expected an integer)")
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid value for {name}: {raw!r} ({exc})") from exc


def _string(name: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"invalid value for {name}: {raw!r} (expected a string)")
    return raw


def _path(name: str, raw: object) -> Path:
    return Path(_string(name, str(raw) if isinstance(raw, Path) else raw))


def _enum_of(kind: type[enum.Enum]) -> Callable[[str, object], object]:
    def convert(name: str, raw: object) -> object:
        try:
            return raw if isinstance(raw, kind) else kind(raw)
        except ValueError as exc:
            allowed = ", ".join(str(member.value) for member in kind)
            raise ConfigError(f"invalid value for {name}: {raw!r} (one of {allowed})") from exc

    return convert


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _boolean(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ConfigError(f"invalid value for {name}: {raw!r} (expected true or false)")


_CONVERTERS: Final[dict[object, Callable[[str, object], object]]] = {
    int: _integer,
    str: _string,
    bool: _boolean,
    Path: _path,
}


def load_settings(mapping: Mapping[str, object]) -> Settings:
    """Build :class:`Settings` from ``mapping``; unknown names and bad values raise ConfigError."""
    unknown = sorted(set(mapping) - set(_HINTS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    return Settings(**{name: _convert(name, value) for name, value in mapping.items()})  # type: ignore[arg-type]


def settings_from_environment(
    environ: Mapping[str, str] | None = None, toml_path: Path | None = None, **overrides: object
) -> Settings:
    """Settings from a TOML file, then ``TOLLWAY_*`` variables, then explicit overrides."""
    mapping: dict[str, object] = {}
    if toml_path is not None:
        try:
            mapping.update(tomllib.loads(toml_path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read configuration file {toml_path}: {exc}") from exc
    env = os.environ if environ is None else environ
    ignored = {"TOLLWAY_CONFIG", "TOLLWAY_GUARD_BYPASS", "TOLLWAY_POSTGRES_URL"}  # options of commands, not settings
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and key not in ignored:
            mapping[key[len(ENV_PREFIX) :].lower()] = value
    mapping.update({key: value for key, value in overrides.items() if value is not None})
    return load_settings(mapping)
