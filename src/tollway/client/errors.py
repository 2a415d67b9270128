"""The SDK's errors: one class per common API error code, chosen from the stable ``code``.

::

    ClientError
    ├── TransportFailure        no answer: connection refused, timeout, protocol error
    └── ApiError                an error answer: status, code, message, details, retry_after_s
        ├── InvalidRequest (400), Unauthorized (401), Forbidden (403), NotFound (404)
        ├── InsufficientFunds, PendingSettlementLimit (402)
        ├── RequestInProgress, InvalidTransition, Conflict (409)
        ├── ReservationExpired (410), PayloadTooLarge (413), IdempotencyKeyReused (422)
        └── ServiceUnavailable (503)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import httpx

RETRY_AFTER_S_DEFAULT: Final = 30
"""What a 503 without a usable Retry-After header means."""


class ClientError(Exception):
    """Root of everything the SDK raises."""


class TransportFailure(ClientError):
    """The request did not get an answer (connection refused, timeout, protocol error)."""


class ApiError(ClientError):
    """The API answered with an error: ``status``, the stable ``code``, ``message`` and ``details``."""

    def __init__(self, status: int, code: str, message: str, details: Mapping[str, Any], retry_after_s: int | None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details)
        self.retry_after_s = retry_after_s


class InvalidRequest(ApiError):
    """400: the request broke a rule; ``details["field_errors"]`` names the fields."""


class Unauthorized(ApiError):
    """401: no token, or a token that does not verify."""


class Forbidden(ApiError):
    """403: the token lacks the scope or the account."""


class InsufficientFunds(ApiError):
    """402: available < requested; ``details`` has available, requested and deficit (micro and CU)."""

    @property
    def deficit_micro(self) -> int:
        """How much is missing, in micro-USD."""
        return int(self.details.get("deficit_micro", 0))


class PendingSettlementLimit(ApiError):
    """402: the account's unsettled charges exceed the risk cap."""


class NotFound(ApiError):
    """404: no such entry or endpoint."""


class RequestInProgress(ApiError):
    """409: the same ``request_id`` is still held."""


class InvalidTransition(ApiError):
    """409: the entry's ``current_state`` does not allow the operation."""

    @property
    def current_state(self) -> str | None:
        """The state the entry is in."""
        value = self.details.get("current_state")
        return value if isinstance(value, str) else None


class Conflict(ApiError):
    """409 for any other reason (e.g. a settlement operation in standalone mode)."""


class ReservationExpired(ApiError):
    """410: the hold expired; reserve again with a new ``request_id``."""


class PayloadTooLarge(ApiError):
    """413: the body is over the server's limit."""


class IdempotencyKeyReused(ApiError):
    """422: the key was used before with other parameters."""


class ServiceUnavailable(ApiError):
    """503: try again after ``retry_after_s`` seconds (guard not ready, reconciliation cap, engine stopped)."""


_BY_CODE: Final[dict[str, type[ApiError]]] = {
    "invalid_request": InvalidRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "insufficient_funds": InsufficientFunds,
    "pending_settlement_limit": PendingSettlementLimit,
    "not_found": NotFound,
    "request_in_progress": RequestInProgress,
    "invalid_transition": InvalidTransition,
    "reservation_expired": ReservationExpired,
    "payload_too_large": PayloadTooLarge,
    "idempotency_key_reused": IdempotencyKeyReused,
}
_BY_STATUS: Final[dict[int, type[ApiError]]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: ReservationExpired,
    413: PayloadTooLarge,
    422: IdempotencyKeyReused,
    503: ServiceUnavailable,
}


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed error for an error response (any body, even a non-JSON one)."""
    return error_from_answer(response.status_code, response.content, response.headers.get("retry-after", ""))


def error_from_answer(status: int, content: bytes, retry: str = "") -> ApiError:
    """The typed error for an error answer: its status, body and Retry-After header ("" when absent)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"error": f"http_{status}", "message": content.decode(errors="replace")[:200]}
    code, message = str(body.pop("error", "")), str(body.pop("message", ""))
    retry_after_s = int(retry) if retry.isdigit() else (RETRY_AFTER_S_DEFAULT if status == 503 else None)
    kind = _BY_CODE.get(code) or _BY_STATUS.get(status, ApiError)
    return kind(status, code, message, body, retry_after_s)
