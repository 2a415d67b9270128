"""Logging set-up for the composition roots, and the structured alert sink.

Only the composition roots (the CLI and the ASGI app factory) call :func:`configure_logging`;
library code just logs — through stdlib ``logging.getLogger("tollway.…")`` or a structlog
logger wrapping one — and never configures anything, so embedding tollway in another program
leaves that program's logging alone.

:func:`configure_logging` routes both kinds through one stdlib handler on the root logger:

- ``json=True`` (production): one JSON object per line on stderr, with ``timestamp`` (ISO 8601,
  UTC), ``level``, ``logger`` and ``event`` beside the call's own keys;
- ``json=False`` (humans at a terminal): structlog's coloured console renderer.

Calling it again replaces its own handler (it is idempotent) and leaves handlers installed by
others — a test runner's capture, say — in place.

:func:`structlog_alert` builds the finalize worker's ``alert`` hook: one error-level
``billing_alert`` line with the alert's details as keys, and ``billing_alerts_total{kind}``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

import structlog
from structlog.typing import Processor

from tollway.core.errors import ConfigError
from tollway.metrics import Metrics

HANDLER_NAME: Final = "tollway"
"""The name of the root handler :func:`configure_logging` installs (and replaces)."""
ALERT_LOGGER: Final = "tollway.alerts"
ALERT_EVENT: Final = "billing_alert"
RESERVED_KEYS: Final = frozenset({"event", "level", "logger", "timestamp", "alert_kind", "exc_info", "stack_info"})
"""Detail keys an alert may not use as-is (they are renamed ``detail_<key>``)."""

Alert = Callable[[str, dict[str, object]], None]
"""The finalize worker's alert hook: ``alert(kind, details)``."""


def parse_level(level: str | int) -> int:
    """A stdlib level from a name (any case) or number; an unknown name is a ConfigError."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        value = logging.getLevelNamesMapping().get(level.strip().upper())
        if value is not None:
            return value
    raise ConfigError(f"unknown log level {level!r} (debug, info, warning, error or critical)")


def _shared_processors() -> list[Processor]:
    """What every record gets, from structlog or from stdlib logging."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(level: str | int = "INFO", *, json: bool = True, stream: TextIO | None = None) -> None:
    """Send all logs, structlog and stdlib alike, to ``stream`` (stderr) as JSON lines or console text."""
    numeric = parse_level(level)
    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json:
        final += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        final.append(structlog.dev.ConsoleRenderer())
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=final, foreign_pre_chain=shared))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)


def _alert_fields(details: Mapping[str, object]) -> dict[str, Any]:
    """Details as log keys; a key that would clash with the line's own keys gets a prefix."""
    fields: dict[str, Any] = {}
    for key, value in details.items():
        name = str(key)
        fields[f"detail_{name}" if name in RESERVED_KEYS else name] = value
    return fields


def structlog_alert(metrics: Metrics | None = None) -> Alert:
    """An alert hook: one error-level ``billing_alert`` line, and a count in ``metrics``."""
    logger = structlog.wrap_logger(logging.getLogger(ALERT_LOGGER))

    def alert(kind: str, details: dict[str, object]) -> None:
        if metrics is not None:
            metrics.alert(kind)
        logger.error(ALERT_EVENT, alert_kind=kind, **_alert_fields(details))

    return alert
