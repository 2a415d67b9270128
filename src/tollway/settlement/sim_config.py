"""The settlement simulator's settings and injected faults.

:class:`SimulatorConfig` is everything the simulator is started with; :class:`Faults` is the
part that can change at runtime (``POST /admin/faults``). :func:`fault_status` is the pure
decision "does this request fail, and how", given one uniform random draw — the caller owns
the seeded generator, so a run with the same seed and the same request order is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from tollway.core.errors import ConfigError, InvalidInput
from tollway.settlement.client import wall_clock_ms
from tollway.settlement.contract import DEFAULT_AUDIENCE, MAX_BODY_BYTES
from tollway.settlement.store import RECORDS_MAX_DEFAULT
from tollway.tokens import DEFAULT_LEEWAY_S, KeyMaterialError, VerificationKey, check_hs256_secret

MAX_LATENCY_MS: Final = 60_000
_STATUS_BOUNDS: Final = (200, 599)


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected failures, changeable at runtime through ``/admin/faults``."""

    error_rate: float = 0.0  # fraction of requests answered 500 or 503 (half each), 0..1
    latency_ms: int = 0  # slept before every /api/internal request
    outage: bool = False  # every /api/internal request is 503 while on
    status_override: int | None = None  # every /api/internal request gets this status (tests)

    def __post_init__(self) -> None:
        if isinstance(self.error_rate, bool) or not isinstance(self.error_rate, int | float):
            raise InvalidInput("error_rate must be a number", field="error_rate")
        if not 0.0 <= self.error_rate <= 1.0:
            raise InvalidInput("error_rate must be between 0 and 1", field="error_rate")
        if isinstance(self.latency_ms, bool) or not isinstance(self.latency_ms, int):
            raise InvalidInput("latency_ms must be an integer", field="latency_ms")
        if not 0 <= self.latency_ms <= MAX_LATENCY_MS:
            raise InvalidInput(f"latency_ms must be between 0 and {MAX_LATENCY_MS}", field="latency_ms")
        if not isinstance(self.outage, bool):
            raise InvalidInput("outage must be true or false", field="outage")
        _check_status_override(self.status_override)

    def to_json(self) -> dict[str, Any]:
        """The faults as ``/admin/faults`` shows them."""
        return {
            "error_rate": self.error_rate,
            "latency_ms": self.latency_ms,
            "outage": self.outage,
            "status_override": self.status_override,
        }


def _check_status_override(status: object) -> None:
    if status is None:
        return
    low, high = _STATUS_BOUNDS
    if isinstance(status, bool) or not isinstance(status, int) or not low <= status <= high:
        raise InvalidInput(f"status_override must be null or an HTTP status {low}-{high}", field="status_override")


def update_faults(faults: Faults, changes: Mapping[str, object]) -> Faults:
    """``faults`` with ``changes`` (any subset of its fields); unknown names are refused."""
    unknown = sorted(set(changes) - set(Faults.__dataclass_fields__))
    if unknown:
        raise InvalidInput(f"unknown fault(s): {', '.join(unknown)}")
    return replace(faults, **changes)  # type: ignore[arg-type]  # __post_init__ checks the types


def fault_status(faults: Faults, roll: float) -> int | None:
    """The status a fault forces on a request, given a uniform ``roll`` in [0, 1); None: no fault."""
    if faults.outage:
        return 503
    if faults.status_override is not None:
        return faults.status_override
    if roll < faults.error_rate / 2:
        return 500
    if roll < faults.error_rate:
        return 503
    return None


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulator verifies tokens, which faults it starts with, and where it keeps its book."""

    keys: Mapping[str, VerificationKey] = field(default_factory=dict)  # by kid
    key_files: tuple[Path, ...] = ()  # PEM / JWK / JWKS files, added to ``keys`` at startup
    audience: str = DEFAULT_AUDIENCE
    issuer: str | None = None  # when set, the token's iss must be this
    allow_hs256: bool = False
    hs256_secret: bytes | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)  # None: admin open to loopback only
    faults: Faults = Faults()
    seed: int = 0  # seeds the error_rate draws
    state_path: Path | None = None  # the book's JSON file; None: memory only
    records_max: int = RECORDS_MAX_DEFAULT
    body_bytes_max: int = MAX_BODY_BYTES
    leeway_s: int = DEFAULT_LEEWAY_S
    clock_ms: Callable[[], int] = wall_clock_ms

    def __post_init__(self) -> None:
        if self.allow_hs256 and self.hs256_secret is not None:
            try:
                check_hs256_secret(self.hs256_secret)
            except KeyMaterialError as exc:
                raise ConfigError(str(exc)) from exc
        if not self.keys and not self.key_files and not (self.allow_hs256 and self.hs256_secret):
            raise ConfigError("the settlement simulator needs a verification key (or an HS256 secret with allow_hs256)")
        if not 1 <= self.records_max <= 100_000_000:
            raise ConfigError(f"records_max must be between 1 and 100000000, got {self.records_max}")
        if not 1024 <= self.body_bytes_max <= 1 << 20:
            raise ConfigError(f"body_bytes_max must be between 1024 and 1048576, got {self.body_bytes_max}")
