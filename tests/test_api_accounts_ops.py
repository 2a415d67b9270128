"""HTTP API: balances, history paging, credits, settlement operations, guard, prices, health, metrics, OpenAPI."""

from __future__ import annotations

import re
from pathlib import Path

from tests.api_fixtures import ADMIN, GATEWAY, READ, Api, api, check_entry, check_error, open_api
from tollway import Settings
from tollway.api.schemas import BalanceOut, BreakerDetailOut, CreditOut, GuardOut, PoisonPageOut, ReadyOut
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.lifecycle import EntryState
from tollway.engine import system_clock_ms
from tollway.service import settlement_signing_key
from tollway.settlement.sim_config import SimulatorConfig
from tollway.settlement.simulator import SimulatorServer
from tollway.testing import FakeClock
from tollway.wal.segments import iter_events

__all__ = ["api"]


async def test_balance_in_micro_and_cu(api: Api) -> None:
    """The balance shows available, held, unsettled and charged in micro (strings) and CU."""
    await api.mint("acct-1", 1_234_567)
    entry_id = await api.held("acct-1", "r", 20_000)
    await api.http.post(
        f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": "15000"}, headers=api.auth(GATEWAY)
    )
    response = await api.http.get("/v1/accounts/acct-1", headers=api.auth(READ))
    body = BalanceOut.model_validate(response.json()).model_dump()
    expected = {
        "available_micro": "1219567",
        "held_micro": "0",
        "unsettled_micro": "0",
        "charged_micro": "15000",
        "available_cu": 121,
        "charged_cu": 1,
    }
    assert expected == {key: body[key] for key in expected}


async def test_unknown_account_has_zero_balances_and_says_it_does_not_exist(api: Api) -> None:
    """An account never seen is all zeros with ``exists: false`` (not a 404); a credited one exists."""
    await api.mint("acct-1", 1_000)
    unknown = await api.http.get("/v1/accounts/acct-l", headers=api.auth(READ))
    known = await api.http.get("/v1/accounts/acct-1", headers=api.auth(READ))
    BalanceOut.model_validate(unknown.json())
    assert (200, "0", False) == (unknown.status_code, unknown.json()["available_micro"], unknown.json()["exists"])
    assert (200, "1000", True) == (known.status_code, known.json()["available_micro"], known.json()["exists"])


async def test_history_pages_with_a_cursor_and_filters_by_state(api: Api) -> None:
    """Entries come oldest first, ``limit`` at a time, following next_cursor; ``state`` filters."""
    await api.mint("acct-1", 100_000)
    await api.mint("acct-2", 100_000, credit_id="m2")
    ids = [await api.held("acct-1", f"r{i}", 100) for i in range(5)]
    await api.held("acct-2", "other", 100)
    await api.http.post(f"/v1/reservations/{ids[1]}/release", json={"reason": "user_cancel"}, headers=api.auth(GATEWAY))
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await api.http.get("/v1/accounts/acct-1/entries", params=params, headers=api.auth(READ))).json()
        seen += [check_entry(item)["billing_entry_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids == seen
    released = await api.http.get("/v1/accounts/acct-1/entries?state=RELEASED", headers=api.auth(READ))
    assert [ids[1]] == [item["billing_entry_id"] for item in released.json()["items"]]
    check_error(
        await api.http.get("/v1/accounts/acct-1/entries?state=NOPE", headers=api.auth(READ)), 400, "invalid_request"
    )
    check_error(
        await api.http.get("/v1/accounts/acct-1/entries?limit=0", headers=api.auth(READ)), 400, "invalid_request"
    )


async def test_credits_are_idempotent_on_credit_id(api: Api) -> None:
    """A mint is 201, its repeat 200 replayed; another amount is 422; a deduct past available is 402."""
    path = "/v1/accounts/acct-1/credits"
    body = {"credit_id": "c1", "kind": "mint", "amount_micro": "5000"}
    first = await api.http.post(path, json=body, headers=api.auth(ADMIN))
    again = await api.http.post(path, json=body, headers=api.auth(ADMIN))
    assert (201, 200, True) == (first.status_code, again.status_code, CreditOut.model_validate(again.json()).replayed)
    assert "5000" == first.json()["balance"]["available_micro"]
    check_error(
        await api.http.post(path, json={**body, "amount_micro": "6000"}, headers=api.auth(ADMIN)),
        422,
        "idempotency_key_reused",
    )
    deduct = {"credit_id": "c2", "kind": "deduct", "amount_micro": "9000"}
    check_error(await api.http.post(path, json=deduct, headers=api.auth(ADMIN)), 402, "insufficient_funds")
    note = {"credit_id": "c3", "kind": "credit_note", "amount_micro": "1", "reason": "refund"}
    assert 201 == (await api.http.post(path, json=note, headers=api.auth(ADMIN))).status_code


async def test_a_mint_that_does_not_match_its_payment_says_what_the_payment_converts_to(api: Api) -> None:
    """400 invalid_request naming amount_micro, with the payment, the rate and converted_micro (SPEC §3)."""
    path = "/v1/accounts/acct-1/credits"
    body = {"credit_id": "m1", "kind": "mint", "amount_micro": "5000000", "paid_micro_usdc": "1"}
    refused = check_error(await api.http.post(path, json=body, headers=api.auth(ADMIN)), 400, "invalid_request")
    assert (["amount_micro"], "1", 1, 1_000_000) == (
        [error["field"] for error in refused["field_errors"]],
        refused["converted_micro"],
        refused["paid_micro_usdc"],
        refused["usd_usdc_rate_ppm"],
    )
    paid = await api.http.post(path, json={**body, "amount_micro": "1"}, headers=api.auth(ADMIN))
    assert 201 == paid.status_code, paid.text


async def test_standalone_settlement_operations(api: Api) -> None:
    """Standalone mode: the dead-letter list is empty; replay and breaker are 409 settlement_not_configured."""
    poison = await api.http.get("/v1/settlement/poison", headers=api.auth(ADMIN))
    assert {"items": [], "next_after": None} == PoisonPageOut.model_validate(poison.json()).model_dump()
    for method, path in [
        ("POST", "/v1/settlement/poison/replay"),
        ("GET", "/v1/settlement/breaker"),
        ("POST", "/v1/settlement/breaker/reset"),
    ]:
        response = await api.http.request(method, path, headers=api.auth(ADMIN))
        check_error(response, 409, "settlement_not_configured")


async def test_dead_letters_replay_and_breaker_in_settlement_mode(tmp_path: Path, redis_url: str) -> None:
    """A FINALIZE_FAILED charge is listed as a dead letter and acked by a bulk replay against a real simulator."""
    data = tmp_path / "data"
    key, _ = settlement_signing_key(Settings(data_dir=data))
    async with SimulatorServer(SimulatorConfig(keys={key.kid: key.public()})) as simulator:
        settings = Settings(data_dir=data, redis_url=redis_url, settlement_url=simulator.url)
        async with open_api(settings, FakeClock(system_clock_ms())) as api:  # settlement tokens need a real time
            await api.mint("acct-1", 10_000)
            entry_id = await api.held("acct-1", "r", 1_000)
            await api.http.post(
                f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": 900}, headers=api.auth(GATEWAY)
            )
            await api.service.engine.execute(cmd.FinalizeFail(entry_id, "test", 5))
            await api.service.projector.sync()
            page = (await api.http.get("/v1/settlement/poison?limit=1", headers=api.auth(ADMIN))).json()
            assert [entry_id] == [item["billing_entry_id"] for item in page["items"]]
            replay = await api.http.post("/v1/settlement/poison/replay", headers=api.auth(ADMIN))
            assert {"examined": 1, "acked": 1, "still_failing": 0, "skipped": 0, "refused": 0} == replay.json()
            assert EntryState.FINALIZE_ACKED == api.service.engine.state.entry_state(entry_id)
            breaker = await api.http.get("/v1/settlement/breaker", headers=api.auth(ADMIN))
            reset = await api.http.post("/v1/settlement/breaker/reset", headers=api.auth(ADMIN))
            closed = {"state": "CLOSED", "value": 0, "failures": 0, "next_probe_at_ms": None}
            assert [closed] * 2 == [{key: body.json()[key] for key in closed} for body in (breaker, reset)]
            BreakerDetailOut.model_validate(breaker.json())


async def test_guard_state_and_reset(api: Api) -> None:
    """The guard is ready after its startup checks; a reset is audited and runs them again."""
    state = await api.http.get("/v1/guard", headers=api.auth(ADMIN))
    assert ("ready", True) == (state.json()["state"], GuardOut.model_validate(state.json()).holds_allowed)
    reset = await api.http.post("/v1/guard/reset", headers=api.auth(ADMIN))
    assert (200, "ready") == (reset.status_code, reset.json()["state"])
    audits = [e.payload for e in iter_events(api.settings.wal_dir) if isinstance(e.payload, ev.Audit)]
    assert [("guard_reset", "tester")] == [(audit.action, audit.actor) for audit in audits]


async def test_prices(api: Api) -> None:
    """The price table lists every model with integer prices per million tokens."""
    response = await api.http.get("/v1/prices", headers=api.auth(READ))
    body = response.json()
    assert 1_000_000 == body["tokens_per_price_unit"]
    assert {"input_micro_per_mtok", "output_micro_per_mtok"} == set(body["models"]["gpt-4o"])


async def test_health_and_readiness(api: Api) -> None:
    """/healthz is ok; /readyz is 200 while holds are allowed and 503 with Retry-After when not."""
    assert {"status": "ok"} == (await api.http.get("/healthz")).json()
    ready = await api.http.get("/readyz")
    body = ReadyOut.model_validate(ready.json())
    assert (200, True, "ready") == (ready.status_code, body.ready, body.guard.state if body.guard else None)
    assert {"stream": 0, "pending": 0, "delayed": 0, "poison": 0} == body.queues
    assert {"kept": 0, "archived": 0, "retention_hours": 168} == body.entries
    api.service.engine.set_holds_allowed(False)
    unready = await api.http.get("/readyz")
    assert (503, False, "30") == (unready.status_code, unready.json()["ready"], unready.headers["retry-after"])


async def test_metrics_are_prometheus_text(api: Api) -> None:
    """/metrics serves the SPEC's metric names in the Prometheus text format, without a token."""
    await api.mint("acct-1", 1_000)
    await api.held("acct-1", "r", 10)
    response = await api.http.get("/metrics")
    assert 200 == response.status_code
    assert response.headers["content-type"].startswith("text/plain")
    assert 'billing_state_transitions_total{from_state="IDLE",to_state="RESERVE_HELD"} 1.0' in response.text


async def test_openapi_documents_every_endpoint(api: Api) -> None:
    """/openapi.json (OpenAPI 3) lists every route of the contract, with bearer security; /docs renders it."""
    spec = (await api.http.get("/openapi.json")).json()
    expected = {
        ("post", "/v1/reservations"),
        ("get", "/v1/reservations/{billing_entry_id}"),
        ("post", "/v1/reservations/{billing_entry_id}/commit"),
        ("post", "/v1/reservations/{billing_entry_id}/release"),
        ("post", "/v1/reservations/{billing_entry_id}/extend"),
        ("post", "/v1/charges"),
        ("post", "/v1/entries/{billing_entry_id}/void"),
        ("post", "/v1/entries/{billing_entry_id}/finalize"),
        ("get", "/v1/accounts/{account_id}"),
        ("get", "/v1/accounts/{account_id}/entries"),
        ("post", "/v1/accounts/{account_id}/credits"),
        ("get", "/v1/settlement/poison"),
        ("post", "/v1/settlement/poison/replay"),
        ("get", "/v1/settlement/breaker"),
        ("post", "/v1/settlement/breaker/reset"),
        ("get", "/v1/guard"),
        ("post", "/v1/guard/reset"),
        ("get", "/v1/prices"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    }
    assert spec["openapi"].startswith("3.")
    assert expected == {(method, path) for path, item in spec["paths"].items() for method in item}
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    reserve = spec["paths"]["/v1/reservations"]["post"]
    assert {"200", "201", "400", "401", "402", "403", "409", "422", "503"} <= set(reserve["responses"])
    docs = await api.http.get("/docs")
    assert (200, True) == (docs.status_code, "swagger" in docs.text.lower())


async def test_docs_page_needs_no_internet(api: Api) -> None:
    """``/docs`` loads nothing from another host, and every script and stylesheet it names is served here."""
    page = await api.http.get("/docs")
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    served = [await api.http.get(url) for url in assets]
    assert (200, [], True) == (page.status_code, [url for url in assets if "//" in url], len(assets) >= 3)
    assert [(200, True)] * len(assets) == [(r.status_code, len(r.content) > 1000) for r in served]
    assert 404 == (await api.http.get("/docs/assets/secrets.txt")).status_code
