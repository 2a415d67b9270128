"""HTTP API: reservations, commits, releases, extensions, direct charges, voids and manual finalize."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.api_fixtures import ADMIN, GATEWAY, READ, Api, api, check_entry, check_error, open_api
from tollway import Settings
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.housekeeping import archive_once
from tollway.testing import FakeClock
from tollway.wal.segments import iter_events

__all__ = ["api"]


async def test_reserve_answers_201_with_the_whole_entry(api: Api) -> None:
    """A new hold is 201 with every documented field, amounts as decimal strings."""
    await api.mint("acct-1", 1_000_000)
    response = await api.reserve("acct-1", "req-1", 20_000, ttl_s=60, correlation_id="trace-7")
    body = check_entry(response.json())
    assert 201 == response.status_code
    assert ("RESERVE_HELD", "20000", None, "0", False) == (
        body["state"],
        body["estimated_cost_micro"],
        body["actual_cost_micro"],
        body["charged_micro"],
        body["replayed"],
    )
    assert api.clock.now + 60_000 == body["expires_at_ms"]
    assert "trace-7" == body["correlation_id"]
    assert {"credit_units_per_usd": 100, "usd_usdc_rate_ppm": 1_000_000, "frozen_at_ms": api.clock.now} == body[
        "exchange_rate_snapshot"
    ]


async def test_integer_amounts_are_accepted_on_input(api: Api) -> None:
    """A JSON integer amount is parsed like its decimal string."""
    await api.mint("acct-1", 1_000)
    body = {"account_id": "acct-1", "request_id": "r", "estimated_cost_micro": 700}
    response = await api.http.post("/v1/reservations", json=body, headers=api.auth(GATEWAY))
    assert (201, "700") == (response.status_code, response.json()["estimated_cost_micro"])


async def test_idempotent_reserve_in_flight_then_stored_response(api: Api) -> None:
    """Same request_id: 409 while held, 200 with the stored response after commit, 422 with other parameters."""
    await api.mint("acct-1", 1_000_000)
    entry_id = await api.held("acct-1", "req-1", 5_000)
    check_error(await api.reserve("acct-1", "req-1", 5_000), 409, "request_in_progress")
    answer = {"choices": [{"text": "hello"}], "usage": {"output_tokens": 3}}
    commit = await api.http.post(
        f"/v1/reservations/{entry_id}/commit",
        json={"actual_cost_micro": "3000", "response": answer},
        headers=api.auth(GATEWAY),
    )
    assert 200 == commit.status_code
    repeat = await api.reserve("acct-1", "req-1", 5_000)
    body = check_entry(repeat.json())
    assert (200, True, answer, "COMMITTED") == (repeat.status_code, body["replayed"], body["response"], body["state"])
    check_error(await api.reserve("acct-1", "req-1", 6_000), 422, "idempotency_key_reused")


async def test_reserve_by_model_prices_the_estimate_and_commit_by_tokens(api: Api) -> None:
    """model + token counts: the estimate rounds up, a commit by tokens prices with the hold's model, rounding down."""
    await api.mint("acct-1", 1_000_000)
    body = {"account_id": "acct-1", "request_id": "r", "model": "gpt-4o", "input_tokens": 1201, "max_output_tokens": 1}
    held = await api.http.post("/v1/reservations", json=body, headers=api.auth(GATEWAY))
    pricing = api.app.state.tollway.pricing
    assert (201, str(pricing.estimate("gpt-4o", 1201, 1))) == (held.status_code, held.json()["estimated_cost_micro"])
    entry_id = held.json()["billing_entry_id"]
    commit = await api.http.post(
        f"/v1/reservations/{entry_id}/commit",
        json={"input_tokens": 1201, "output_tokens": 0},
        headers=api.auth(GATEWAY),
    )
    assert str(pricing.actual("gpt-4o", 1201, 0)) == commit.json()["actual_cost_micro"]
    other = {**body, "max_output_tokens": 2}
    check_error(
        await api.http.post("/v1/reservations", json=other, headers=api.auth(GATEWAY)), 422, "idempotency_key_reused"
    )


async def test_reserve_form_mistakes_are_400_naming_the_field(api: Api) -> None:
    """Both forms at once, neither, an incomplete model form, or an unknown model: 400 with field errors."""
    base = {"account_id": "acct-1", "request_id": "r"}
    cases = [
        ({**base, "estimated_cost_micro": "1", "model": "gpt-4o"}, "estimated_cost_micro"),
        (base, "estimated_cost_micro"),
        ({**base, "model": "gpt-4o", "input_tokens": 1}, "max_output_tokens"),
        ({**base, "model": "no-such-model", "input_tokens": 1, "max_output_tokens": 1}, "model"),
        ({**base, "estimated_cost_micro": "1", "extra": 1}, "extra"),
        ({**base, "estimated_cost_micro": "01x"}, "estimated_cost_micro"),
    ]
    for body, field in cases:
        response = await api.http.post("/v1/reservations", json=body, headers=api.auth(GATEWAY))
        error = check_error(response, 400, "invalid_request")
        assert [field] == [item["field"] for item in error["field_errors"]], body


async def test_insufficient_funds_reports_micro_and_cu(api: Api) -> None:
    """402 names available, requested and the deficit, in micro-USD (strings) and CU."""
    await api.mint("acct-1", 10_000)
    error = check_error(await api.reserve("acct-1", "r", 25_000), 402, "insufficient_funds")
    expected = {
        "available_micro": "10000",
        "requested_micro": "25000",
        "deficit_micro": "15000",
        "available_cu": 1,
        "requested_cu": 3,
        "deficit_cu": 2,
    }
    assert expected == {key: error[key] for key in expected}


async def test_get_commit_release_extend(api: Api) -> None:
    """GET shows the entry; extend moves the expiry; release returns the hold; repeats are replayed."""
    await api.mint("acct-1", 100_000)
    first = await api.held("acct-1", "r1", 1_000)
    got = await api.http.get(f"/v1/reservations/{first}", headers=api.auth(READ))
    assert (200, first) == (got.status_code, check_entry(got.json())["billing_entry_id"])
    extended = await api.http.post(f"/v1/reservations/{first}/extend", json={"ttl_s": 3000}, headers=api.auth(GATEWAY))
    assert api.clock.now + 3_000_000 == extended.json()["expires_at_ms"]
    path = f"/v1/reservations/{first}/release"
    released = await api.http.post(path, json={"reason": "user_cancel"}, headers=api.auth(GATEWAY))
    again = await api.http.post(path, json={"reason": "user_cancel"}, headers=api.auth(GATEWAY))
    assert ("RELEASED", False, True) == (
        released.json()["state"],
        released.json()["replayed"],
        again.json()["replayed"],
    )
    error = check_error(
        await api.http.post(
            f"/v1/reservations/{first}/commit", json={"actual_cost_micro": 1}, headers=api.auth(GATEWAY)
        ),
        409,
        "invalid_transition",
    )
    assert "RELEASED" == error["current_state"]


async def test_a_stored_response_over_64_kib_is_refused(api: Api) -> None:
    """A commit whose response is larger than 64 KiB is 400 naming ``response``; nothing is charged."""
    await api.mint("acct-1", 100_000)
    entry_id = await api.held("acct-1", "r1", 1_000)
    body = {"actual_cost_micro": "10", "response": {"text": "x" * (64 << 10)}}
    response = await api.http.post(f"/v1/reservations/{entry_id}/commit", json=body, headers=api.auth(GATEWAY))
    assert ["response"] == [item["field"] for item in check_error(response, 400, "invalid_request")["field_errors"]]
    assert "RESERVE_HELD" == api.service.engine.state.entries[entry_id].state.value


async def test_commit_after_expiry_is_410(api: Api) -> None:
    """An expired hold can never be committed, even before the sweeper ran."""
    await api.mint("acct-1", 100_000)
    entry_id = await api.held("acct-1", "r1", 1_000)
    api.clock.advance(301_000)
    response = await api.http.post(
        f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": 10}, headers=api.auth(GATEWAY)
    )
    check_error(response, 410, "reservation_expired")


async def test_unknown_and_malformed_entry_ids(api: Api) -> None:
    """A well-formed unknown id is 404 not_found; a malformed one is 400."""
    unknown = "01JH0000000000000000000000"
    check_error(await api.http.get(f"/v1/reservations/{unknown}", headers=api.auth(READ)), 404, "not_found")
    response = await api.http.post(
        f"/v1/reservations/{unknown}/commit", json={"actual_cost_micro": 1}, headers=api.auth(GATEWAY)
    )
    check_error(response, 404, "not_found")
    check_error(await api.http.get("/v1/reservations/not-a-ulid", headers=api.auth(READ)), 400, "invalid_request")


async def test_charge_void_and_manual_finalize(api: Api) -> None:
    """A direct charge is 201 (200 on repeat); an admin voids it as the token's subject; finalize needs pending."""
    await api.mint("acct-1", 10_000)
    body = {"account_id": "acct-1", "request_id": "fee-1", "amount_micro": "4000"}
    charged = await api.http.post("/v1/charges", json=body, headers=api.auth(GATEWAY))
    repeat = await api.http.post("/v1/charges", json=body, headers=api.auth(GATEWAY))
    assert (201, 200, True) == (charged.status_code, repeat.status_code, repeat.json()["replayed"])
    entry_id = charged.json()["billing_entry_id"]
    finalize = await api.http.post(f"/v1/entries/{entry_id}/finalize", headers=api.auth(ADMIN))
    assert "COMMITTED" == check_error(finalize, 409, "invalid_transition")["current_state"]
    voided = await api.http.post(f"/v1/entries/{entry_id}/void", json={"reason": "goodwill"}, headers=api.auth(ADMIN))
    assert ("VOIDED", "goodwill") == (voided.json()["state"], voided.json()["reason"])
    voids = [e.payload for e in iter_events(api.settings.wal_dir) if isinstance(e.payload, ev.BillingVoid)]
    assert ["tester"] == [payload.admin_id for payload in voids]
    partial = {"account_id": "acct-1", "request_id": "fee-2", "amount_micro": "99999", "allow_partial": True}
    clamped = await api.http.post("/v1/charges", json=partial, headers=api.auth(GATEWAY))
    assert ("10000", "89999") == (clamped.json()["charged_micro"], clamped.json()["uncollected_micro"])


async def test_manual_finalize_in_settlement_mode(tmp_path: Path, redis_url: str) -> None:
    """In settlement mode a commit is FINALIZE_PENDING and an admin may finalize it by hand (source admin)."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, settlement_url="http://127.0.0.1:9")
    async with open_api(settings, FakeClock()) as api:
        await api.mint("acct-1", 10_000)
        entry_id = await api.held("acct-1", "r", 1_000)
        commit = await api.http.post(
            f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": 800}, headers=api.auth(GATEWAY)
        )
        assert "FINALIZE_PENDING" == commit.json()["state"]
        acked = await api.http.post(f"/v1/entries/{entry_id}/finalize", headers=api.auth(ADMIN))
        assert (200, "FINALIZE_ACKED") == (acked.status_code, acked.json()["state"])


async def test_gates_refuse_new_holds_with_retry_after(tmp_path: Path, redis_url: str) -> None:
    """Guard not ready → 503 BILLING_EVALUATOR_UNAVAILABLE; reconciliation cap → 503; risk cap → 402."""
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        settlement_url="http://127.0.0.1:9",
        max_pending_reconciliation=1,
        max_pending_risk_cu=0,
    )
    async with open_api(settings, FakeClock()) as api:
        await api.mint("acct-1", 100_000)
        await api.mint("acct-2", 100_000, credit_id="m2")
        entry_id = await api.held("acct-1", "r1", 1_000)
        await api.http.post(
            f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": 500}, headers=api.auth(GATEWAY)
        )
        check_error(await api.reserve("acct-1", "r2", 1), 402, "pending_settlement_limit")
        await api.service.engine.execute(cmd.FinalizeFail(entry_id, "test", 5))
        response = await api.reserve("acct-2", "r3", 1)
        check_error(response, 503, "billing_service_unavailable")
        assert "30" == response.headers["retry-after"]
        api.service.engine.set_holds_allowed(False)
        check_error(await api.reserve("acct-2", "r4", 1), 503, "BILLING_EVALUATOR_UNAVAILABLE")


async def test_a_thousand_concurrent_reserves_against_funds_for_a_hundred(api: Api) -> None:
    """1,000 concurrent reserves of 1,000 micro against 100,000: exactly 100 × 201, the rest 402, available 0."""
    await api.mint("acct-1", 100_000)
    headers = api.auth(GATEWAY)

    async def one(i: int) -> int:
        body = {"account_id": "acct-1", "request_id": f"r-{i}", "estimated_cost_micro": "1000"}
        return (await api.http.post("/v1/reservations", json=body, headers=headers)).status_code

    statuses = await asyncio.gather(*(one(i) for i in range(1000)))
    assert {201: 100, 402: 900} == {status: statuses.count(status) for status in set(statuses)}
    balance = await api.http.get("/v1/accounts/acct-1", headers=headers)
    assert ("0", "100000") == (balance.json()["available_micro"], balance.json()["held_micro"])


async def test_an_archived_entry_is_not_found_and_its_request_id_is_new_again(api: Api) -> None:
    """Past the retention an entry is gone from the API: 404 on reads and actions, a new hold on a retry."""
    await api.mint("acct-1", 100_000)
    entry_id = await api.held("acct-1", "req-1", 5_000)
    done = await api.http.post(
        f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": "3000"}, headers=api.auth(GATEWAY)
    )
    assert 200 == done.status_code, done.text
    api.clock.advance(8 * 24 * 3_600_000)  # past the default retention of 7 days
    assert (1, 1) == await archive_once(api.service.engine)  # the entry and the mint's credit record
    read = await api.http.get(f"/v1/reservations/{entry_id}", headers=api.auth(READ))
    assert "archived past the retention" in check_error(read, 404, "not_found")["message"]
    again = await api.http.post(
        f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": "3000"}, headers=api.auth(GATEWAY)
    )
    check_error(again, 404, "not_found")
    retry = await api.reserve("acct-1", "req-1", 5_000)
    assert 201 == retry.status_code, retry.text
    assert entry_id != retry.json()["billing_entry_id"]
    listed = await api.http.get("/v1/accounts/acct-1/entries", headers=api.auth(READ))
    assert [retry.json()["billing_entry_id"]] == [item["billing_entry_id"] for item in listed.json()["items"]]
    balance = (await api.http.get("/v1/accounts/acct-1", headers=api.auth(READ))).json()
    assert ("92000", "5000", "3000") == (balance["available_micro"], balance["held_micro"], balance["charged_micro"])
    ready = (await api.http.get("/readyz")).json()
    assert {"kept": 1, "archived": 1, "retention_hours": 168} == ready["entries"]


async def test_a_void_is_refused_while_settlement_is_being_called_for_the_entry(tmp_path: Path, redis_url: str) -> None:
    """409 settlement_call_in_flight while the worker calls settlement for the entry; the void goes through after."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, settlement_url="http://127.0.0.1:9")
    async with open_api(settings, FakeClock()) as api:
        await api.mint("acct-1", 10_000)
        entry_id = await api.held("acct-1", "r", 1_000)
        await api.http.post(
            f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": 800}, headers=api.auth(GATEWAY)
        )
        await api.service.engine.execute(cmd.FinalizeFail(entry_id, "test", 5))
        worker = api.service.worker
        assert worker is not None
        worker.in_flight.add(entry_id)  # the worker is between its request and settlement's answer
        body = {"reason": "refund"}
        refused = await api.http.post(f"/v1/entries/{entry_id}/void", json=body, headers=api.auth(ADMIN))
        assert entry_id == check_error(refused, 409, "settlement_call_in_flight")["billing_entry_id"]
        worker.in_flight.discard(entry_id)
        voided = await api.http.post(f"/v1/entries/{entry_id}/void", json=body, headers=api.auth(ADMIN))
        assert (200, "VOIDED") == (voided.status_code, voided.json()["state"])


async def test_commit_above_the_hold_says_what_the_overrun_policy_did(api: Api) -> None:
    """An overrun commit shows the excess, the part charged from available and the uncollected rest; others null."""
    await api.mint("acct-1", 10_500)
    over, exact = await api.held("acct-1", "over", 5_000), await api.held("acct-1", "exact", 1_000)
    commit = "/v1/reservations/{}/commit"
    overrun = await api.http.post(commit.format(over), json={"actual_cost_micro": 12_000}, headers=api.auth(GATEWAY))
    normal = await api.http.post(commit.format(exact), json={"actual_cost_micro": 900}, headers=api.auth(GATEWAY))
    expected = {"overrun_micro": "7000", "collected_micro": "4500", "uncollected_micro": "2500"}
    assert (expected, None) == (check_entry(overrun.json())["overrun"], check_entry(normal.json())["overrun"])


async def test_overrun_under_the_cap_policy_collects_nothing_above_the_hold(tmp_path: Path, redis_url: str) -> None:
    """With ``overrun_policy = cap`` the whole excess is reported uncollected."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, overrun_policy=cmd.OverrunPolicy.CAP)
    async with open_api(settings, FakeClock()) as api:
        await api.mint("acct-1", 100_000)
        entry_id = await api.held("acct-1", "r", 5_000)
        body = {"actual_cost_micro": "6000"}
        answer = await api.http.post(f"/v1/reservations/{entry_id}/commit", json=body, headers=api.auth(GATEWAY))
    expected = {"overrun_micro": "1000", "collected_micro": "0", "uncollected_micro": "1000"}
    assert ("5000", expected) == (answer.json()["charged_micro"], answer.json()["overrun"])


async def test_a_release_without_its_reason_names_the_allowed_reasons(api: Api) -> None:
    """No body, or a body without ``reason``: 400 naming the field and its allowed values, not just "Field required"."""
    await api.mint("acct-1", 10_000)
    entry_id = await api.held("acct-1", "r", 1_000)
    url = f"/v1/reservations/{entry_id}/release"
    bodiless = check_error(await api.http.post(url, headers=api.auth(GATEWAY)), 400, "invalid_request")
    empty = check_error(await api.http.post(url, json={}, headers=api.auth(GATEWAY)), 400, "invalid_request")
    allowed = "reason (one of 'pre_stream_failure', 'user_cancel')"
    assert [("body", f"a JSON body is required: {allowed}"), ("reason", f"Field required: {allowed}")] == [
        (body["field_errors"][0]["field"], body["field_errors"][0]["message"]) for body in (bodiless, empty)
    ]
