"""Wire encoding: engine records → JSON bodies, with amounts as decimal strings.

Every amount named ``*_micro`` leaves as a canonical decimal string (JSON numbers lose integer
precision in many clients beyond 2⁵³); credit units (``*_cu``) are integers, rounded as the SPEC
says: estimates and holds up, charges and balances down. Bodies are plain dicts encoded with
msgspec — the pydantic models of :mod:`tollway.api.schemas` document exactly these shapes
(the tests check every answer against them), but are not on the hot path.

A stored gateway response is kept as the JSON text the gateway sent and embedded verbatim
(``msgspec.Raw``), so it is never parsed again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec
from starlette.responses import Response

from tollway.core.commands import CreditResult
from tollway.core.money import Rounding, micro_to_cu
from tollway.core.pricing import TOKENS_PER_PRICE_UNIT, PriceTable
from tollway.core.state import Account, Entry

JSON_MEDIA_TYPE: Final = "application/json"

_encoder: Final = msgspec.json.Encoder()


def json_response(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``body`` encoded as JSON, with ``status``."""
    return Response(_encoder.encode(body), status, dict(headers) if headers else None, media_type=JSON_MEDIA_TYPE)


def entry_body(entry: Entry, *, replayed: bool = False, response_json: str | None = None) -> dict[str, object]:
    """An entry as the API shows it; ``response`` is the stored gateway response, if any."""
    rate = entry.rate
    actual = entry.actual_cost_micro
    return {
        "billing_entry_id": entry.billing_entry_id,
        "account_id": entry.account_id,
        "request_id": entry.request_id,
        "kind": entry.kind,
        "state": entry.state.value,
        "estimated_cost_micro": str(entry.estimated_cost_micro),
        "actual_cost_micro": None if actual is None else str(actual),
        "charged_micro": str(entry.charged_micro),
        "uncollected_micro": str(entry.uncollected_micro),
        "estimated_cost_cu": micro_to_cu(entry.estimated_cost_micro, rate.credit_units_per_usd, Rounding.UP),
        "charged_cu": micro_to_cu(entry.charged_micro, rate.credit_units_per_usd, Rounding.DOWN),
        "expires_at_ms": entry.expires_at_ms,
        "exchange_rate_snapshot": {
            "credit_units_per_usd": rate.credit_units_per_usd,
            "usd_usdc_rate_ppm": rate.usd_usdc_rate_ppm,
            "frozen_at_ms": rate.frozen_at_ms,
        },
        "correlation_id": entry.correlation_id,
        "reason": entry.reason,
        "created_at_ms": entry.created_at_ms,
        "updated_at_ms": entry.updated_at_ms,
        "wal_sequence": entry.wal_sequence,
        "replayed": replayed,
        "response": None if response_json is None else msgspec.Raw(response_json.encode()),
        "overrun": overrun_body(entry),
    }


def overrun_body(entry: Entry) -> dict[str, str] | None:
    """When the actual cost exceeded the hold: by how much, and what the overrun policy did with it."""
    actual = entry.actual_cost_micro
    if entry.kind != "reserve" or actual is None or actual <= entry.estimated_cost_micro:
        return None
    return {
        "overrun_micro": str(actual - entry.estimated_cost_micro),
        "collected_micro": str(entry.charged_micro - entry.estimated_cost_micro),
        "uncollected_micro": str(entry.uncollected_micro),
    }


def balance_body(
    account_id: str, account: Account, credit_units_per_usd: int, wal_sequence: int, *, exists: bool = True
) -> dict[str, object]:
    """An account's balances in micro-USD and credit units, as of ``wal_sequence``.

    ``exists`` is false for an account no credit or entry ever touched (all zeros): a typo in an
    account id must not look like an empty account.
    """
    rate = credit_units_per_usd
    return {
        "account_id": account_id,
        "exists": exists,
        "available_micro": str(account.available_micro),
        "held_micro": str(account.held_micro),
        "unsettled_micro": str(account.unsettled_micro),
        "charged_micro": str(account.charged_micro),
        "available_cu": micro_to_cu(account.available_micro, rate, Rounding.DOWN),
        "held_cu": micro_to_cu(account.held_micro, rate, Rounding.UP),
        "unsettled_cu": micro_to_cu(account.unsettled_micro, rate, Rounding.DOWN),
        "charged_cu": micro_to_cu(account.charged_micro, rate, Rounding.DOWN),
        "credit_units_per_usd": rate,
        "wal_sequence": wal_sequence,
    }


def credit_body(result: CreditResult, credit_units_per_usd: int) -> dict[str, object]:
    """The answer to a mint, deduct or credit note: the operation and the balance after it."""
    return {
        "account_id": result.account_id,
        "credit_id": result.credit_id,
        "kind": result.kind.value,
        "amount_micro": str(result.amount_micro),
        "wal_sequence": result.wal_sequence,
        "replayed": result.replayed,
        "balance": balance_body(result.account_id, result.balance, credit_units_per_usd, result.wal_sequence),
    }


def prices_body(pricing: PriceTable) -> dict[str, object]:
    """``GET /v1/prices``: micro-USD per 1,000,000 tokens, input and output, per model."""
    models = {
        name: {"input_micro_per_mtok": price.input_micro_per_mtok, "output_micro_per_mtok": price.output_micro_per_mtok}
        for name, price in pricing.items()
    }
    return {"tokens_per_price_unit": TOKENS_PER_PRICE_UNIT, "models": models}
