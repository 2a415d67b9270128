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

:func:`direct_json_lines` is the fast lane for the engine's transition lines (one per state
change, thousands a second under load): while that JSON handler is the only consumer of a
logger, a batch of lines is rendered with msgspec and written in one go — the same keys,
``timestamp`` format and one line per record as the structlog route, a fraction of its cost.
Whenever anything else listens (another handler, a filter, bound context variables, the
console renderer), it declines and the caller logs line by line as usual.

:func:`structlog_alert` builds the finalize worker's ``alert`` hook: one error-level
``billing_alert`` line with the alert's details as keys, and ``billing_alerts_total{kind}``.
"""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

import msgspec
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

_json_handler: logging.Handler | None = None
"""The JSON handler :func:`configure_logging` installed last (None: console or not configured)."""
_json_processors: tuple[Processor, ...] | None = None
"""The structlog processors installed with it (reconfiguring structlog disables the fast lane)."""
_encode_line = msgspec.json.Encoder().encode


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
    processors: list[Processor] = [
        structlog.stdlib.filter_by_level,
        *shared,
        structlog.processors.StackInfoRenderer(),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    structlog.configure(
        processors=processors,
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
    global _json_handler, _json_processors  # what the fast lane checks it may stand in for
    _json_handler, _json_processors = (handler, tuple(processors)) if json else (None, None)


def direct_json_lines(logger_name: str, event: str, lines: list[dict[str, object]]) -> bool:
    """Write INFO ``lines`` (fields of ``event``) for ``logger_name`` in one write; False if it may not.

    It may when the JSON handler of :func:`configure_logging` is the only handler on the way up
    from the logger to the root, nothing on that way filters, the handler takes INFO and no
    structlog context is bound: exactly the cases where the structlog route would produce the
    same lines (``timestamp``, ``level``, ``logger``, ``event`` and the fields) and nothing else.
    The caller has checked that the logger is enabled for INFO.
    """
    handler = _json_handler
    if handler is None or handler.filters or handler.level > logging.INFO or structlog.contextvars.get_contextvars():
        return False
    stream = getattr(handler, "stream", None)
    if stream is None or tuple(structlog.get_config()["processors"]) != _json_processors:
        return False  # structlog was reconfigured since (structlog.testing.capture_logs edits the list in place)
    current = logging.getLogger(logger_name)
    while current.parent is not None:
        if current.filters or current.handlers or not current.propagate:
            return False
        current = current.parent
    if current.filters or current.handlers != [handler]:
        return False
    timestamp = datetime.datetime.now(tz=datetime.UTC).isoformat().replace("+00:00", "Z")
    envelope = {"event": event, "logger": logger_name, "level": "info", "timestamp": timestamp}
    for fields in lines:  # the caller's fresh dicts: the envelope goes after their keys, as structlog puts it
        fields.update(envelope)
    text = b"\n".join([_encode_line(fields) for fields in lines]).decode() + "\n"
    handler.acquire()
    try:
        stream.write(text)
        handler.flush()
    except Exception:  # noqa: BLE001 - as logging.Handler.emit: a broken stream must not break billing
        handler.handleError(logging.makeLogRecord({"msg": event, "name": logger_name}))
    finally:
        handler.release()
    return True


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
