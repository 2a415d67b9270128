"""A node's ``/metrics``: the figures of the shards it serves, each labelled by ``shard``.

Each node exports only the shards it serves at the moment of the scrape (one set of series per
shard, with the label ``shard``), plus a few figures of the node itself. A shard that moves shows
up under its new node at the next scrape, so summing a series over every node's scrape gives the
cluster's total (minus a shard caught mid-move). The names are the single-node service's
(:mod:`tollway.metrics`) with the ``shard`` label added where a shard has them, so one
dashboard serves both; figures only a cluster has start with ``cluster_``.

Everything is read from the running engines at scrape time (a Prometheus collector), so nothing
is kept for a shard the node no longer serves. Each served shard's conservation guard shows as
``billing_guard_state{shard,state}`` (one-hot), ``billing_guard_recovery_stopped{shard}`` and
``billing_invariant_violations_total{shard,check}`` (check runs that found a violation since
this node started serving the shard: a counter that starts again when the shard moves, which
Prometheus' ``rate``/``increase`` take as a reset). Not here: the per-event counters and latency
histograms of the single-node service (its engine observer), and the projection, queue and
breaker figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tollway.cluster.node import Node
from tollway.cluster.shard_guard import ShardGuard
from tollway.core.guard import CHECK_NAMES, GuardState
from tollway.metrics import BALANCE_NAMES, balance_totals_micro

SHARD_LABEL: Final = "shard"


class ShardCollector(Collector):
    """Collects the node's figures and those of each shard it serves, when scraped."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """One family per figure; one sample per served shard."""
        engines = self.node.local_engines()
        served = GaugeMetricFamily("cluster_shards_served", "Shards this node serves now.", value=len(engines))
        total = GaugeMetricFamily("cluster_shards", "Shards of the cluster.", value=self.node.info.shards)
        epoch = _family("cluster_shard_epoch", "The lease epoch this node serves the shard under.")
        durable = _family("wal_durable_sequence", "Highest sequence of the shard's log known durable.")
        kept = _family("billing_entries", "Entries the shard's engine keeps.")
        archived = _family("billing_entries_archived", "Entries of the shard archived past the retention.")
        pending = _family("billing_pending_reconciliation", "FINALIZE_FAILED entries of the shard.")
        balance = GaugeMetricFamily(
            "billing_balance_micro",
            "MicroUSD over the shard's accounts: available, held, unsettled, charged.",
            labels=[SHARD_LABEL, "balance"],
        )
        for number, engine in engines.items():
            label = [str(number)]
            epoch.add_metric(label, self.node.membership.serving(number) or 0)
            durable.add_metric(label, engine.durable_sequence)
            kept.add_metric(label, len(engine.state.entries) + len(engine.state.settled))
            archived.add_metric(label, engine.state.archived_entries)
            pending.add_metric(label, engine.state.finalize_failed_count)
            totals = balance_totals_micro(engine.state.accounts.values())
            for name in BALANCE_NAMES:
                balance.add_metric([*label, name], totals[name])
        yield from (served, total, epoch, durable, kept, archived, pending, balance)
        yield from _guard_families(self.node.local_guards())


def _guard_families(guards: dict[int, ShardGuard]) -> Iterator[Metric]:
    """The conservation guard of each served shard, named as the single-node service names it."""
    state = GaugeMetricFamily(
        "billing_guard_state", "Conservation guard state of the shard (one-hot).", labels=[SHARD_LABEL, "state"]
    )
    stopped = _family("billing_guard_recovery_stopped", "1 after an invariant violation, until an admin reset.")
    violations = CounterMetricFamily(
        "billing_invariant_violations",
        "Guard check runs of the shard that found a violation, since this node serves it.",
        labels=[SHARD_LABEL, "check"],
    )
    for number, guard in guards.items():
        label = str(number)
        record = guard.runner.guard
        for each in GuardState:
            state.add_metric([label, each.value], 1 if each is record.state else 0)
        stopped.add_metric([label], 1 if record.recovery_stopped else 0)
        for check in CHECK_NAMES:
            violations.add_metric([label, check], guard.violations[check])
    yield from (state, stopped, violations)


def _family(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=[SHARD_LABEL])


class NodeMetrics:
    """The registry a node's ``/metrics`` renders (only :class:`ShardCollector` in it)."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ShardCollector(node))

    def render_for(self, accept_header: str) -> tuple[bytes, str]:
        """The figures in the format the scraper asked for (text or OpenMetrics) and its content type."""
        encoder, content_type = choose_encoder(accept_header)
        return encoder(self.registry), content_type
