"""The settlement contract (SPEC §8), shared by the client and the simulator: pure functions.

::

    POST {settlement_url}/api/internal/finalize
    Authorization: Bearer <JWT>          ES256 + kid (HS256 only when explicitly allowed)
    Idempotency-Key: <billing_entry_id>
    {"reservationId": <billing_entry_id>, "accountId": …, "actualCostMicro": "<decimal>", "traceId": …}

    JWT claims: iss, aud ("arrakis"), sub (= accountId), tenant_id, purpose ("billing_finalize"),
                reservation_id (= reservationId), trace_id, iat, exp (= iat + 300 s)

    200 finalized · 409 already finalized (both success) · 400 malformed body · 401 bad token ·
    403 token not for this call · 422 well-formed but meaningless (an id that is not a ULID)

    GET {settlement_url}/api/internal/finalized?cursor=&limit=   (any valid token; audit)

This module builds the body and the claims from a :class:`FinalizeRequest`, and parses and
judges a body the way the simulator does. It does no I/O and reads no clock: ``now_ms`` is an
argument. Money is an ``int`` here and a canonical decimal string on the wire.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import msgspec

from tollway.core.errors import InvalidInput
from tollway.core.ids import (
    MAX_ID_LENGTH,
    UNTRACED,
    check_account_id,
    check_correlation_id,
    check_entry_id,
)
from tollway.core.money import INT64_MAX, MAX_MICRO_USD_LENGTH, check_micro, format_micro

FINALIZE_PATH: Final = "/api/internal/finalize"
FINALIZED_PATH: Final = "/api/internal/finalized"
PURPOSE_FINALIZE: Final = "billing_finalize"
PURPOSE_AUDIT: Final = "billing_audit"
DEFAULT_ISSUER: Final = "tollway"
DEFAULT_AUDIENCE: Final = "arrakis"
DEFAULT_TENANT_ID: Final = "default"
TOKEN_LIFETIME_S: Final = 300
SETTLEMENT_TIMEOUT_MS: Final = 1000
MAX_BODY_BYTES: Final = 64 * 1024
"""Largest finalize body the simulator reads (a real one is ~200 bytes)."""
PAGE_LIMIT_DEFAULT: Final = 100
PAGE_LIMIT_MAX: Final = 1000

_CANONICAL_MICRO: Final = re.compile(r"0|[1-9][0-9]*")
_BODY_FIELDS: Final = ("reservationId", "accountId", "actualCostMicro", "traceId")


@dataclass(frozen=True, slots=True)
class FinalizeRequest:
    """One committed charge to finalize with settlement."""

    billing_entry_id: str  # a ULID; also the Idempotency-Key and the JWT's reservation_id
    account_id: str
    actual_cost_micro: int  # MicroUSD, ≥ 0
    correlation_id: str = UNTRACED  # sent as traceId
    tenant_id: str = DEFAULT_TENANT_ID


@dataclass(frozen=True, slots=True)
class Problem:
    """A finalize call refused by settlement: the status and the error body."""

    status: int
    error: str  # a stable code
    message: str

    def body(self) -> dict[str, str]:
        """The JSON error body ``{"error", "message"}``."""
        return {"error": self.error, "message": self.message}


def check_request(request: FinalizeRequest) -> FinalizeRequest:
    """Return ``request`` if every field may be sent; else :class:`InvalidInput` naming the field."""
    check_entry_id(request.billing_entry_id)
    check_account_id(request.account_id)
    check_micro(request.actual_cost_micro, field="actual_cost_micro")
    if request.correlation_id != check_correlation_id(request.correlation_id):
        raise InvalidInput("correlation_id must not be empty", field="correlation_id")
    if not _is_tenant_id(request.tenant_id):
        raise InvalidInput("tenant_id must be 1-128 printable characters", field="tenant_id")
    return request


def finalize_body(request: FinalizeRequest) -> dict[str, str]:
    """The JSON body of a finalize call."""
    return {
        "reservationId": request.billing_entry_id,
        "accountId": request.account_id,
        "actualCostMicro": format_micro(request.actual_cost_micro),
        "traceId": request.correlation_id,
    }


def finalize_claims(
    request: FinalizeRequest, *, issuer: str, audience: str, now_ms: int, lifetime_s: int = TOKEN_LIFETIME_S
) -> dict[str, object]:
    """The JWT claims of a finalize call made at ``now_ms``."""
    iat = now_ms // 1000
    return {
        "iss": issuer,
        "aud": audience,
        "sub": request.account_id,
        "tenant_id": request.tenant_id,
        "purpose": PURPOSE_FINALIZE,
        "reservation_id": request.billing_entry_id,
        "trace_id": request.correlation_id,
        "iat": iat,
        "exp": iat + lifetime_s,
    }


def audit_claims(
    *, issuer: str, audience: str, tenant_id: str, now_ms: int, lifetime_s: int = TOKEN_LIFETIME_S
) -> dict[str, object]:
    """The JWT claims of a call that reads the finalized list."""
    iat = now_ms // 1000
    return {
        "iss": issuer,
        "aud": audience,
        "sub": issuer,
        "tenant_id": tenant_id,
        "purpose": PURPOSE_AUDIT,
        "iat": iat,
        "exp": iat + lifetime_s,
    }


def parse_finalize_body(raw: bytes, tenant_id: str = DEFAULT_TENANT_ID) -> FinalizeRequest | Problem:
    """Judge a finalize body: the request it carries, or the 400/422 problem with it."""
    try:
        document = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return Problem(400, "invalid_request", "the body is not valid JSON")
    if not isinstance(document, dict):
        return Problem(400, "invalid_request", "the body must be a JSON object")
    for name in _BODY_FIELDS:
        if not isinstance(document.get(name), str):
            return Problem(400, "invalid_request", f"{name} is required and must be a string")
    amount = document["actualCostMicro"]
    if len(amount) > MAX_MICRO_USD_LENGTH or _CANONICAL_MICRO.fullmatch(amount) is None:
        return Problem(400, "invalid_request", "actualCostMicro must be a canonical decimal string")
    if int(amount) > INT64_MAX:
        return Problem(422, "invalid_amount", "actualCostMicro does not fit in a signed 64-bit integer")
    request = FinalizeRequest(
        document["reservationId"], document["accountId"], int(amount), document["traceId"], tenant_id
    )
    try:
        return check_request(request)
    except InvalidInput as exc:
        return Problem(422, "invalid_field", _wire_message(exc))


def _wire_message(exc: InvalidInput) -> str:
    names = {
        "billing_entry_id": "reservationId",
        "account_id": "accountId",
        "correlation_id": "traceId",
    }
    field = exc.field or ""
    return str(exc).replace(field, names.get(field, field), 1) if field else str(exc)


def check_binding(claims: Mapping[str, Any], request: FinalizeRequest) -> FinalizeRequest | Problem:
    """Whether a verified token was issued for this very call (403 if not); the tenant comes from it."""
    if claims.get("purpose") != PURPOSE_FINALIZE:
        return Problem(403, "forbidden", f"the token's purpose is not {PURPOSE_FINALIZE}")
    if claims.get("reservation_id") != request.billing_entry_id:
        return Problem(403, "forbidden", "the token's reservation_id does not match reservationId")
    if claims.get("sub") != request.account_id:
        return Problem(403, "forbidden", "the token's sub does not match accountId")
    tenant_id = claims.get("tenant_id", DEFAULT_TENANT_ID)
    if not _is_tenant_id(tenant_id):
        return Problem(403, "forbidden", "the token's tenant_id is not 1-128 printable characters")
    return replace(request, tenant_id=tenant_id)


def _is_tenant_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable()
