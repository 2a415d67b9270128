"""Prometheus metrics and the observer that feeds them, plus one JSON log line per transition.

:class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` — never the global
default — so several engines (shards) or test cases can live in one process without their
metrics colliding. Every name of SPEC §12 is defined here, with seconds for durations:

==========================================  ==========  ======================================
name                                        type        meaning
==========================================  ==========  ======================================
billing_state_transitions_total             counter     {from_state, to_state} entry moves
billing_reserve_duration_seconds            histogram   reserve, decide → durable
billing_commit_duration_seconds             histogram   commit, decide → durable
billing_finalize_duration_seconds           histogram   finalize ack/fail, decide → durable
billing_command_duration_seconds            histogram   {command} every other command
billing_pending_reconciliation_count        gauge       FINALIZE_FAILED entries
billing_pending_reconciliation_limit        gauge       max_pending_reconciliation: new holds get 503 there
billing_balance_micro                       gauge       {balance} MicroUSD over all accounts (available, held, …)
billing_circuit_breaker_state               gauge       CLOSED 0, OPEN 1, HALF_OPEN 2
billing_rejections_total                    counter     {reason} refusals by code
billing_uncollected_overrun_micro_total     counter     MicroUSD of overruns not collected
billing_guard_state                         gauge       {state} one-hot: 1 for the current state
billing_guard_recovery_stopped              gauge       1 after a violation until an admin reset
billing_invariant_violations_total          counter     {check} check runs that found a violation
billing_projection_lag_events               gauge       durable WAL events not yet in Redis
billing_projection_lag_seconds              gauge       age of the oldest unprojected event
billing_projection_connected                gauge       1 while Redis answers the projector
billing_projection_redis_refusing           gauge       1 while Redis answers the projector's writes with an
                                                        error (maxmemory reached, read-only, …): billing goes on
billing_projection_divergences              gauge       projections found differing from the WAL (each rebuilt)
billing_projection_stopped                  gauge       1 when the projector stopped for an operator (repeated
                                                        divergences, or keys owned by another data directory)
billing_embedded_redis_up                   gauge       1 while the embedded redis-server runs (absent with redis_url)
billing_embedded_redis_restarts             gauge       times the embedded redis-server was started again
billing_projection_pump                     gauge       {state} one-hot: on, off, failed (the projection pump)
billing_finalize_queue_depth                gauge       {queue} stream, pending, delayed, poison
billing_alerts_total                        counter     {kind} alerts raised
wal_replay_duration_seconds                 gauge       the startup recovery (snapshot + replay)
wal_replayed_events                         gauge       events replayed at startup
wal_recovery_snapshot_sequence              gauge       the snapshot recovery began from (0: none)
wal_fsync_duration_seconds                  histogram   write + fdatasync of one group-commit batch
wal_batch_records                           histogram   records per group-commit batch
wal_appended_records_total                  counter     records written
wal_appended_bytes_total                    counter     bytes written
wal_durable_sequence                        gauge       the highest sequence on disk
==========================================  ==========  ======================================

Counters move from the engine's observer port (:class:`MetricsObserver`); gauges that describe
*state* (queue depths, lag, breaker) are pulled by :meth:`Metrics.collect_from` just before a
scrape, so ``/metrics`` is fresh without background polling.

Each state transition is also logged through the stdlib logger ``tollway.transitions`` (via
structlog) as one ``billing_state_transition`` line with exactly ``billing_entry_id,
from_state, to_state, cost_micro_usd, account_id, correlation_id, wal_sequence``.
``cost_micro_usd`` is the estimate for a hold and its release or expiry, and the charged amount
for everything after a commit (commit, direct charge, finalize, void). An extension (same state,
new expiry) is not a transition and is neither counted nor logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

from tollway.core.commands import RefusalCode
from tollway.core.events import Event
from tollway.core.guard import CHECK_NAMES, CheckResult, CheckStatus, Guard, GuardState
from tollway.core.lifecycle import TRANSITIONS, EntryState
from tollway.core.state import Account, Transition
from tollway.redis.errors import UNAVAILABLE

if TYPE_CHECKING:
    from tollway.engine import Engine
    from tollway.finalizer import FinalizeWorker
    from tollway.redis.projector import Projector, ProjectorStatus
    from tollway.redis.queue import FinalizeQueue
    from tollway.redis.server import ServerWatch

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""The content type of :meth:`Metrics.render`."""
QUEUE_NAMES: Final = ("stream", "pending", "delayed", "poison")
ALERT_KINDS: Final = ("finalize_poison", "finalize_escalation")
"""The finalize worker's alert kinds, shown at zero from the start (others appear when raised)."""
QUEUE_DEPTH_TIMEOUT_S: Final = 0.5
"""A scrape never waits longer than this for Redis; stale depths are kept meanwhile."""
TRANSITION_LOGGER: Final = "tollway.transitions"
BALANCE_NAMES: Final = ("available", "held", "unsettled", "charged")
"""The ``balance`` labels of ``billing_balance_micro``."""
TRANSITION_EVENT: Final = "billing_state_transition"
TRANSITION_LOG_KEYS: Final = (
    "billing_entry_id",
    "from_state",
    "to_state",
    "cost_micro_usd",
    "account_id",
    "correlation_id",
    "wal_sequence",
)
LATENCY_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FSYNC_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
JsonLines = Callable[[str, str, list[dict[str, object]]], bool]
"""``write(logger_name, event, lines)``: write INFO lines of structured fields directly, in one go.

Returns False when it cannot stand in for stdlib logging right now (another handler, a filter,
bound context…); the caller then logs each line the ordinary way. ``tollway.logs`` makes one.
"""
_HOLD_STATES: Final = frozenset({EntryState.RESERVE_HELD, EntryState.RELEASED})
_CHARGE_LANDINGS: Final = frozenset({EntryState.COMMITTED, EntryState.FINALIZE_PENDING})


PUMP_STATES: Final = ("on", "off", "failed")
"""The values of ``ProjectorStatus.pump``, each a label of ``billing_projection_pump``."""


class Metrics:
    """Every tollway metric, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._billing(self.registry)
        self._guard_and_queues(self.registry)
        self._wal(self.registry)
        self._initialize_labels()

    def _billing(self, r: CollectorRegistry) -> None:
        self.state_transitions = Counter(
            "billing_state_transitions_total", "Entry state transitions.", ["from_state", "to_state"], registry=r
        )
        self.reserve_duration = Histogram(
            "billing_reserve_duration_seconds", "Reserve, decide to durable.", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.commit_duration = Histogram(
            "billing_commit_duration_seconds", "Commit, decide to durable.", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.finalize_duration = Histogram(
            "billing_finalize_duration_seconds",
            "Recording a finalize ack or failure, decide to durable.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.command_duration = Histogram(
            "billing_command_duration_seconds",
            "Other commands, decide to durable.",
            ["command"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.rejections = Counter("billing_rejections_total", "Refused commands by reason.", ["reason"], registry=r)
        self.uncollected_overrun = Counter(
            "billing_uncollected_overrun_micro_total", "MicroUSD of overruns that could not be charged.", registry=r
        )
        self.pending_reconciliation = Gauge(
            "billing_pending_reconciliation_count", "Entries in FINALIZE_FAILED awaiting an admin.", registry=r
        )
        self.alerts = Counter("billing_alerts_total", "Alerts raised, by kind.", ["kind"], registry=r)

    def _guard_and_queues(self, r: CollectorRegistry) -> None:
        self.breaker_state = Gauge(
            "billing_circuit_breaker_state", "Settlement breaker: CLOSED 0, OPEN 1, HALF_OPEN 2.", registry=r
        )
        self.guard_state = Gauge("billing_guard_state", "Conservation guard state (one-hot).", ["state"], registry=r)
        self.guard_recovery_stopped = Gauge(
            "billing_guard_recovery_stopped", "1 after an invariant violation, until an admin reset.", registry=r
        )
        self.invariant_violations = Counter(
            "billing_invariant_violations_total", "Guard check runs that found a violation.", ["check"], registry=r
        )
        self.projection_lag_events = Gauge(
            "billing_projection_lag_events", "Durable WAL events not yet projected into Redis.", registry=r
        )
        self.projection_lag_seconds = Gauge(
            "billing_projection_lag_seconds", "Age of the oldest durable event not yet projected.", registry=r
        )
        self.projection_connected = Gauge(
            "billing_projection_connected", "1 while the projector reaches Redis.", registry=r
        )
        self.projection_redis_refusing = Gauge(
            "billing_projection_redis_refusing",
            "1 while Redis answers the projector's writes with an error (maxmemory, read-only): billing goes on.",
            registry=r,
        )
        self.projection_divergences = Gauge(
            "billing_projection_divergences", "Projections found differing from the WAL, each rebuilt.", registry=r
        )
        self.projection_stopped = Gauge(
            "billing_projection_stopped", "1 when the projector stopped and waits for an operator.", registry=r
        )
        self.embedded_redis_up = Gauge(
            "billing_embedded_redis_up", "1 while the embedded redis-server runs.", registry=r
        )
        self.embedded_redis_restarts = Gauge(
            "billing_embedded_redis_restarts", "Times the embedded redis-server was started again.", registry=r
        )
        self.projection_pump = Gauge(
            "billing_projection_pump",
            "Projection pump state (one-hot): on, off (not used), failed (batches encoded in the event loop).",
            ["state"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "billing_finalize_queue_depth", "Finalize queue depths (stream, pending, delayed, poison).", ["queue"],
            registry=r,
        )  # fmt: skip

    def _wal(self, r: CollectorRegistry) -> None:
        self.wal_replay_duration = Gauge(
            "wal_replay_duration_seconds", "Startup recovery: newest snapshot plus WAL replay.", registry=r
        )
        self.wal_replayed_events = Gauge("wal_replayed_events", "Events replayed at startup.", registry=r)
        self.wal_recovery_snapshot_sequence = Gauge(
            "wal_recovery_snapshot_sequence", "Sequence of the snapshot startup recovery began from.", registry=r
        )
        self.wal_fsync_duration = Histogram(
            "wal_fsync_duration_seconds", "Write and fdatasync of one batch.", buckets=FSYNC_BUCKETS_S, registry=r
        )
        self.wal_batch_records = Histogram(
            "wal_batch_records", "Records per group-commit batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.wal_appended_records = Counter("wal_appended_records_total", "WAL records written.", registry=r)
        self.wal_appended_bytes = Counter("wal_appended_bytes_total", "WAL bytes written.", registry=r)
        self.wal_durable_sequence = Gauge("wal_durable_sequence", "Highest WAL sequence on disk.", registry=r)
        self.pending_reconciliation_limit = Gauge(
            "billing_pending_reconciliation_limit", "FINALIZE_FAILED entries at which new holds get 503.", registry=r
        )
        self.balance = Gauge(
            "billing_balance_micro",
            "MicroUSD over all accounts: available, held, unsettled, charged.",
            ["balance"],
            registry=r,
        )
        self.entries_kept = Gauge("billing_entries", "Entries the engine keeps (in memory and in Redis).", registry=r)
        self.entries_archived = Gauge(
            "billing_entries_archived", "Entries archived past the retention, over the log's life.", registry=r
        )

    def _initialize_labels(self) -> None:
        """Create every known label combination at zero, so rates and dashboards start at once."""
        for source, targets in TRANSITIONS.items():
            for target in targets:
                self.state_transitions.labels(source.value, target.value)
        for code in RefusalCode:
            self.rejections.labels(code.value)
        for check in CHECK_NAMES:
            self.invariant_violations.labels(check)
        for queue in QUEUE_NAMES:
            self.queue_depth.labels(queue)
        for balance in BALANCE_NAMES:
            self.balance.labels(balance)
        for kind in ALERT_KINDS:
            self.alerts.labels(kind)
        self.set_guard(Guard())

    # -- updates that are not from the observer ------------------------------------------------

    def set_guard(self, guard: Guard) -> None:
        """Show ``guard`` in the one-hot state gauge and the recovery-stopped flag."""
        for state in GuardState:
            self.guard_state.labels(state.value).set(1 if state is guard.state else 0)
        self.guard_recovery_stopped.set(1 if guard.recovery_stopped else 0)

    def guard_checked(self, guard: Guard, results: Iterable[CheckResult]) -> None:
        """A guard check run finished: count each violated check once and show the new state.

        Suits :class:`tollway.guard.GuardRunner`'s ``on_checked`` hook.
        """
        for result in results:
            if result.status is CheckStatus.VIOLATED:
                self.invariant_violations.labels(result.name).inc()
        self.set_guard(guard)

    def alert(self, kind: str) -> None:
        """Count one alert of ``kind``."""
        self.alerts.labels(kind).inc()

    async def collect_from(
        self,
        *,
        engine: Engine | None = None,
        worker: FinalizeWorker | None = None,
        projector: Projector | None = None,
        queue: FinalizeQueue | None = None,
        guard: Guard | None = None,
        redis_watch: ServerWatch | None = None,
    ) -> None:
        """Refresh the state gauges from the running parts; call just before :meth:`render`.

        Never raises for an unreachable Redis: the queue depths then keep their last values.
        """
        if redis_watch is not None:
            self.embedded_redis_up.set(1 if redis_watch.up else 0)
            self.embedded_redis_restarts.set(redis_watch.restarts)
        if engine is not None:
            self._collect_engine(engine)
        if worker is not None:
            self.breaker_state.set(worker.breaker_state().value)
        if projector is not None:
            self._collect_projection(projector.status())
        if guard is not None:
            self.set_guard(guard)
        if queue is not None:
            try:
                depths = await asyncio.wait_for(queue.depths(), QUEUE_DEPTH_TIMEOUT_S)
            except (*UNAVAILABLE, TimeoutError):
                return
            for name, depth in depths.items():
                self.queue_depth.labels(name).set(depth)

    def _collect_engine(self, engine: Engine) -> None:
        self.pending_reconciliation.set(engine.state.finalize_failed_count)
        self.pending_reconciliation_limit.set(engine.policy.max_pending_reconciliation)
        for name, total in balance_totals_micro(engine.state.accounts.values()).items():
            self.balance.labels(name).set(total)
        self.wal_durable_sequence.set(engine.durable_sequence)
        self.entries_kept.set(len(engine.state.entries) + len(engine.state.settled))
        self.entries_archived.set(engine.state.archived_entries)

    def _collect_projection(self, status: ProjectorStatus) -> None:
        self.projection_lag_events.set(status.lag_events)
        self.projection_lag_seconds.set(status.lag_ms / 1000)
        self.projection_connected.set(1 if status.connected else 0)
        self.projection_redis_refusing.set(1 if status.redis_error is not None else 0)
        self.projection_divergences.set(status.divergences)
        self.projection_stopped.set(1 if status.violation is not None else 0)
        for state in PUMP_STATES:
            self.projection_pump.labels(state).set(1 if status.pump == state else 0)

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def render_for(self, accept_header: str) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (text or OpenMetrics) and its content type."""
        encoder, content_type = choose_encoder(accept_header)
        return encoder(self.registry), content_type


def balance_totals_micro(accounts: Iterable[Account]) -> dict[str, int]:
    """Available, held, unsettled and charged MicroUSD summed over ``accounts`` (one pass, at scrape time)."""
    available = held = unsettled = charged = 0
    for account in accounts:
        available += account.available_micro
        held += account.held_micro
        unsettled += account.unsettled_micro
        charged += account.charged_micro
    return {"available": available, "held": held, "unsettled": unsettled, "charged": charged}


def transition_cost_micro(change: Transition) -> int:
    """The amount a transition line reports: the estimate for holds, the charged amount after."""
    entry = change.entry
    return entry.estimated_cost_micro if change.to_state in _HOLD_STATES else entry.charged_micro


class MetricsObserver:
    """The engine's observer port, implemented with :class:`Metrics` and structured logs.

    Quick and never raising, as the port requires: labelled children are cached, the log lines
    are skipped entirely when ``tollway.transitions`` is not enabled for INFO, and a batch's
    lines go out in one write through ``json_lines`` when the composition root provides it (one
    line per transition either way; stdlib logging per line costs ~100 µs each, the direct
    write a few).
    """

    def __init__(self, metrics: Metrics, *, log_transitions: bool = True, json_lines: JsonLines | None = None) -> None:
        self.metrics = metrics
        self.log_transitions = log_transitions
        self._json_lines = json_lines
        self._stdlib = logging.getLogger(TRANSITION_LOGGER)
        self._log = structlog.wrap_logger(self._stdlib)
        self._transition_children: dict[tuple[EntryState, EntryState], Counter] = {}
        self._durations: dict[str, Histogram] = {
            "Reserve": metrics.reserve_duration,
            "Commit": metrics.commit_duration,
            "FinalizeAck": metrics.finalize_duration,
            "FinalizeFail": metrics.finalize_duration,
        }

    def transitioned(self, changes: Sequence[tuple[Event, Transition]]) -> None:
        """Count each move, add any uncollected overrun, and log one line per move."""
        lines: list[dict[str, object]] | None = (
            [] if self.log_transitions and self._stdlib.isEnabledFor(logging.INFO) else None
        )
        children = self._transition_children
        for event, change in changes:
            if change.from_state is change.to_state:
                continue  # an extension: same state, new expiry
            key = (change.from_state, change.to_state)
            child = children.get(key)
            if child is None:
                child = children[key] = self.metrics.state_transitions.labels(
                    change.from_state.value, change.to_state.value
                )
            child.inc()
            entry = change.entry
            if change.to_state in _CHARGE_LANDINGS and entry.uncollected_micro > 0:
                self.metrics.uncollected_overrun.inc(entry.uncollected_micro)
            if lines is not None:
                lines.append(
                    {
                        "billing_entry_id": entry.billing_entry_id,
                        "from_state": change.from_state.value,
                        "to_state": change.to_state.value,
                        "cost_micro_usd": transition_cost_micro(change),
                        "account_id": entry.account_id,
                        "correlation_id": event.correlation_id,
                        "wal_sequence": event.wal_sequence,
                    }
                )
        if not lines:
            return
        if self._json_lines is not None and self._json_lines(TRANSITION_LOGGER, TRANSITION_EVENT, lines):
            return
        for fields in lines:
            self._log.info(TRANSITION_EVENT, **fields)

    def refused(self, command: str, code: str) -> None:  # noqa: ARG002 - the port's signature; reason is the label
        """Count a refusal by its code."""
        self.metrics.rejections.labels(code).inc()

    def wal_batch(self, records: int, size_bytes: int, sync_seconds: float) -> None:
        """Record one group-commit batch."""
        m = self.metrics
        m.wal_fsync_duration.observe(sync_seconds)
        m.wal_batch_records.observe(records)
        m.wal_appended_records.inc(records)
        m.wal_appended_bytes.inc(size_bytes)

    def command_done(self, command: str, seconds: float) -> None:
        """Time a command: reserve, commit and finalize have their own histograms."""
        histogram = self._durations.get(command)
        if histogram is None:
            histogram = self._durations[command] = self.metrics.command_duration.labels(command)
        histogram.observe(seconds)

    def recovered(self, events: int, seconds: float, from_snapshot: int) -> None:
        """Record the startup recovery."""
        self.metrics.wal_replay_duration.set(seconds)
        self.metrics.wal_replayed_events.set(events)
        self.metrics.wal_recovery_snapshot_sequence.set(from_snapshot)
