"""A node's operations endpoints that are not settlement: /metrics by shard, /v1/prices, /docs offline.

Two nodes in one process on the test's PostgreSQL, each with its API over ASGI; node ``b``
forwards to node ``a`` through an ASGI transport, so forwarding is the real code path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.in_process_node import node_client
from tollway import Settings
from tollway.api.auth import Authenticator, Scope, development_key, issue_token
from tollway.cluster.node import Node
from tollway.core.assignment import assign
from tollway.core.lease import LeaseTiming
from tollway.core.pricing import PriceTable
from tollway.pg.schema import init_cluster, open_cluster
from tollway.pricing import default_prices, load_prices

TIMING = LeaseTiming(ttl_ms=5_000, renew_every_ms=1_000, margin_ms=500)
SHARDS = 4
PRICES = """
[models."m"]
input_micro_per_mtok = 1_000_000
output_micro_per_mtok = 2_000_000
"""


@dataclass
class Pair:
    """Nodes ``a`` and ``b`` with a client to each; ``b`` forwards to ``a``."""

    a: Node
    b: Node
    to_a: httpx.AsyncClient
    to_b: httpx.AsyncClient
    headers: dict[str, str]


async def settle(a: Node, b: Node) -> None:
    """Tick both nodes until each serves exactly what assign() gives it."""
    target = assign(SHARDS, ["a", "b"])
    for _ in range(10):
        await a.tick()
        await b.tick()
        if dict.fromkeys(a.local_engines(), "a") | dict.fromkeys(b.local_engines(), "b") == target:
            return
    raise AssertionError("the two nodes did not settle")


@pytest.fixture
async def pair(pg_pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Pair]:
    """Nodes ``a`` (a price file of its own) and ``b`` (the shipped prices), settled."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
        info = await open_cluster(connection)
    settings = Settings(data_dir=tmp_path)
    key, _ = development_key(settings)
    token = issue_token(key, settings, [Scope.ADMIN.value], subject="t", ttl_s=600)
    auth = Authenticator.from_settings(settings)
    (tmp_path / "prices.toml").write_text(PRICES)
    a = Node(pg_pool, info, settings, node_id="a", advertise_url="http://a.invalid", timing=TIMING)
    b = Node(pg_pool, info, settings, node_id="b", advertise_url="http://b.invalid", timing=TIMING)
    await settle(a, b)

    def app(node: Node, pricing: PriceTable, forwarder: httpx.AsyncClient) -> httpx.AsyncClient:
        return node_client(node, authenticator=auth, pricing=pricing, forwarder=forwarder)

    async with httpx.AsyncClient() as nowhere:
        to_a = app(a, load_prices(tmp_path / "prices.toml"), nowhere)
        async with to_a, app(b, default_prices(), to_a) as to_b:
            yield Pair(a, b, to_a, to_b, {"authorization": f"Bearer {token}"})
    await a.leave()
    await b.leave()


def account_of(node: Node) -> str:
    """An account whose shard ``node`` serves."""
    return next(f"acct-{i}" for i in range(1000) if node.shard_of_account(f"acct-{i}") in node.local_engines())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) → value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_nodes_metrics_are_its_served_shards_labelled_by_shard(pair: Pair) -> None:
    """/metrics of each node: its served shards only, each with its epoch, sequence and balances."""
    mine, theirs = account_of(pair.a), account_of(pair.b)
    for account, amount in ((mine, 700), (theirs, 300)):
        credit = {"credit_id": "c1", "kind": "mint", "amount_micro": amount}
        assert (
            201
            == (await pair.to_b.post(f"/v1/accounts/{account}/credits", json=credit, headers=pair.headers)).status_code
        )
    hold = {"account_id": mine, "request_id": "r1", "estimated_cost_micro": 200}
    assert 201 == (await pair.to_a.post("/v1/reservations", json=hold, headers=pair.headers)).status_code
    scraped = {
        name: samples((await client.get("/metrics")).text) for name, client in (("a", pair.to_a), ("b", pair.to_b))
    }
    a_shard, b_shard = str(pair.a.shard_of_account(mine)), str(pair.b.shard_of_account(theirs))
    served = {
        name: sorted(s for (metric, labels), _ in found.items() if metric == "cluster_shard_epoch" for _, s in labels)
        for name, found in scraped.items()
    }
    assert {
        "a": sorted(str(n) for n in pair.a.local_engines()),
        "b": sorted(str(n) for n in pair.b.local_engines()),
    } == served
    a_metrics = scraped["a"]
    assert float(len(pair.a.local_engines())) == a_metrics[("cluster_shards_served", ())]
    assert float(SHARDS) == a_metrics[("cluster_shards", ())]
    assert (500.0, 200.0) == (
        a_metrics[("billing_balance_micro", (("balance", "available"), ("shard", a_shard)))],
        a_metrics[("billing_balance_micro", (("balance", "held"), ("shard", a_shard)))],
    )
    assert 300.0 == scraped["b"][("billing_balance_micro", (("balance", "available"), ("shard", b_shard)))]
    assert 2.0 == a_metrics[("wal_durable_sequence", (("shard", a_shard),))]
    assert (
        float(pair.a.membership.serving(int(a_shard)) or -1)
        == a_metrics[("cluster_shard_epoch", (("shard", a_shard),))]
    )
    assert ("billing_balance_micro", (("balance", "available"), ("shard", b_shard))) not in a_metrics


async def test_prices_are_each_nodes_own_and_the_owner_prices_a_forwarded_reservation(pair: Pair) -> None:
    """GET /v1/prices answers the node's table; /v1/cluster shows its digest; the shard's owner prices a hold."""
    prices = {
        name: (await c.get("/v1/prices", headers=pair.headers)).json()
        for name, c in (("a", pair.to_a), ("b", pair.to_b))
    }
    digests = {
        name: (await c.get("/v1/cluster", headers=pair.headers)).json()["prices_sha256"]
        for name, c in (("a", pair.to_a), ("b", pair.to_b))
    }
    account = account_of(pair.a)
    credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 10_000_000}
    await pair.to_a.post(f"/v1/accounts/{account}/credits", json=credit, headers=pair.headers)
    hold = {"account_id": account, "request_id": "r1", "model": "m", "input_tokens": 1_000, "max_output_tokens": 1_000}
    forwarded = await pair.to_b.post("/v1/reservations", json=hold, headers=pair.headers)  # b does not know model m
    unknown_here = await pair.to_b.post(
        "/v1/reservations", json={**hold, "account_id": account_of(pair.b)}, headers=pair.headers
    )
    assert {"m": {"input_micro_per_mtok": 1_000_000, "output_micro_per_mtok": 2_000_000}} == prices["a"]["models"]
    assert "m" not in prices["b"]["models"]
    assert 64 == len(digests["a"])
    assert digests["a"] != digests["b"]
    assert (201, "3000") == (forwarded.status_code, forwarded.json()["estimated_cost_micro"])
    assert 400 == unknown_here.status_code


async def test_docs_are_served_offline_by_a_node(pair: Pair) -> None:
    """/docs points only at local assets, which the node serves; /openapi.json lists the node's routes."""
    page = await pair.to_a.get("/docs")
    asset = await pair.to_a.get("/docs/assets/swagger-ui-bundle.js")
    schema = (await pair.to_a.get("/openapi.json")).json()
    assert (200, 200) == (page.status_code, asset.status_code)
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    assert {"/v1/reservations", "/v1/cluster", "/v1/prices"} <= set(schema["paths"])
