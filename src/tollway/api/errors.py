"""The one error table of the HTTP API: every failure becomes ``{"error": code, "message": …, …details}``.

Business refusals come back from the engine as :class:`~tollway.core.commands.Refusal` values;
everything else that can go wrong is an exception. Both end here, in one place:

=====================================  ======  =================================================
code                                   status  raised by
=====================================  ======  =================================================
``invalid_request``                    400     bad JSON, a field that breaks a rule (``field_errors``)
``unauthorized``                       401     no bearer token, or one that does not verify
``insufficient_funds``                 402     available < requested (micro and CU, ``deficit``)
``pending_settlement_limit``           402     the account's unsettled exposure is over the cap
``forbidden``                          403     the token lacks the scope or the account
``not_found``                          404     no such entry, or no such route
``method_not_allowed``                 405     a route that exists, another method
``request_in_progress``                409     the same ``request_id`` is still held
``invalid_transition``                 409     the entry's ``current_state`` forbids it
``settlement_not_configured``          409     a settlement operation in standalone mode
``settlement_call_in_flight``          409     a void while settlement is being called for the entry
``reservation_expired``                410     the hold's ``expires_at_ms`` passed
``payload_too_large``                  413     a body over ``http_body_bytes_max``, never parsed
``idempotency_key_reused``             422     the same key with other parameters
``billing_service_unavailable``        503     too many charges await reconciliation
``BILLING_EVALUATOR_UNAVAILABLE``      503     the conservation guard is not ready
``service_unavailable``                503     the engine stopped (fail-stop); restart recovers
``redis_unavailable``                  503     a read that needs Redis while it is down
``shard_moved``                        503     cluster mode: the shard's lease moved or is moving; retry
``internal_error``                     500     a bug; never the answer to bad input
=====================================  ======  =================================================

Every 503 carries ``Retry-After`` (seconds: :data:`RETRY_AFTER_S`, or :data:`SHARD_MOVED_RETRY_AFTER_S`
for ``shard_moved``, since a shard is served again within a lease time). Amounts in details are decimal strings when the
key ends in ``_micro``, like everywhere else on the wire. Handlers never build an error body
themselves: they raise :class:`ApiError` or return the refusal to :func:`refusal_response`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Literal, get_args, get_origin

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tollway.api.schemas import ErrorOut
from tollway.api.wire import json_response
from tollway.core.commands import Refusal, RefusalCode
from tollway.core.errors import EngineStopped, InvalidInput, ShardFenced, TollwayError, WalIOFailure
from tollway.redis.errors import RedisDown, RedisRefused

log = logging.getLogger("tollway.api")

RETRY_AFTER_S: Final = 30
"""What every 503 tells the client to wait, in seconds."""
SHARD_MOVED_RETRY_AFTER_S: Final = 1
"""What ``shard_moved`` tells the client to wait: the new owner serves the shard within a lease time."""

ERROR_STATUS: Final[Mapping[str, int]] = {
    "invalid_request": 400,
    "unauthorized": 401,
    "insufficient_funds": 402,
    "pending_settlement_limit": 402,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_in_progress": 409,
    "invalid_transition": 409,
    "settlement_not_configured": 409,
    "settlement_call_in_flight": 409,
    "reservation_expired": 410,
    "payload_too_large": 413,
    "idempotency_key_reused": 422,
    "billing_service_unavailable": 503,
    "BILLING_EVALUATOR_UNAVAILABLE": 503,
    "service_unavailable": 503,
    "redis_unavailable": 503,
    "shard_moved": 503,
    "internal_error": 500,
}
"""The status of every error code. The one table."""

_PATH_SHOWN_MAX: Final = 200
_CODE_OF_HTTP_STATUS: Final = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


class ApiError(TollwayError):
    """An error the API answers with ``ERROR_STATUS[code]`` and the stable body."""

    def __init__(self, code: str, message: str, **details: object) -> None:
        super().__init__(message)
        if code not in ERROR_STATUS:
            raise KeyError(f"error code {code!r} is not in the error table")
        self.code = code
        self.message = message
        self.details = details


def error_response(code: str, message: str, details: Mapping[str, object] | None = None) -> Response:
    """The stable error body with the status of ``code`` (and ``Retry-After`` on a 503)."""
    status = ERROR_STATUS[code]
    body: dict[str, object] = {"error": code, "message": message}
    for key, value in (details or {}).items():
        body[key] = str(value) if key.endswith("_micro") and isinstance(value, int) else value
    retry_after_s = SHARD_MOVED_RETRY_AFTER_S if code == "shard_moved" else RETRY_AFTER_S
    headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    return json_response(body, status, headers)


def refusal_response(refusal: Refusal) -> Response:
    """A refusal of the engine, answered by its code's row of the table (``invalid_request`` with field errors).

    An ``invalid_request`` refusal keeps its other details beside the field errors (a mint that
    does not match its payment: ``converted_micro``, ``paid_micro_usdc``, ``usd_usdc_rate_ppm``).
    """
    if refusal.code is RefusalCode.INVALID_REQUEST:
        details = {key: value for key, value in refusal.details.items() if key != "field"}
        return field_errors_response([(str(refusal.details.get("field", "")), refusal.message)], details=details)
    return error_response(refusal.code.value, refusal.message, refusal.details)


def field_errors_response(
    errors: Sequence[tuple[str, str]], message: str | None = None, *, details: Mapping[str, object] | None = None
) -> Response:
    """400 ``invalid_request`` naming each offending field (and ``details``, if any, beside them)."""
    items = [{"field": field, "message": text} for field, text in errors]
    summary = message or "; ".join(
        text if not field or text.startswith(field) else f"{field}: {text}" for field, text in errors
    )
    return error_response("invalid_request", summary, {**(details or {}), "field_errors": items})


_GATES: Final = ("pending_settlement_limit", "billing_service_unavailable", "BILLING_EVALUATOR_UNAVAILABLE")
_ALWAYS: Final = ("invalid_request", "unauthorized", "forbidden", "service_unavailable")


def errors_doc(*codes: str, public: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route may answer (``"guard"``: the hold gates).

    Every route may answer 400 and 503 ``service_unavailable``; unless ``public``, also 401 and 403.
    """
    wanted = [code for code in _ALWAYS if not (public and code in ("unauthorized", "forbidden"))]
    for code in codes:
        wanted.extend(_GATES if code == "guard" else (code,))
    by_status: dict[int, list[str]] = {}
    for code in wanted:
        by_status.setdefault(ERROR_STATUS[code], []).append(code)
    return {
        status: {"model": ErrorOut, "description": "error: " + ", ".join(names)}
        for status, names in sorted(by_status.items())
    }


# -- exception handlers ----------------------------------------------------------------------


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message, exc.details)


async def _invalid_input(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidInput)
    return field_errors_response([(exc.field or "", str(exc))])


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    model = _body_model(request)
    return field_errors_response([_field_error(error, model) for error in exc.errors()])


def _field_error(error: Mapping[str, Any], model: type[BaseModel] | None = None) -> tuple[str, str]:
    """``(dotted field path, message)`` of one pydantic error; never echoes the input.

    A missing body or field names what is required (and a choice's allowed values) from the
    route's body ``model``, so ``Field required`` is never the whole answer.
    """
    location = [str(part) for part in error.get("loc", ())]
    in_body = bool(location) and location[0] == "body"
    if location and location[0] in ("body", "query", "path", "header"):
        location = location[1:]
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "json_invalid":
        return "", "the body is not valid JSON"
    if error.get("type") == "model_attributes_type" and not location:
        return "", "the body must be a JSON object sent with Content-Type: application/json"
    if error.get("type") == "missing" and in_body and model is not None:
        if not location:
            return "body", f"a JSON body is required: {_required_fields(model)}"
        if len(location) == 1 and location[0] in model.model_fields:
            return location[0], f"Field required: {_describe_field(location[0], model.model_fields[location[0]])}"
    return ".".join(location), message.removeprefix("Value error, ")


def _body_model(request: Request) -> type[BaseModel] | None:
    """The pydantic model of the matched route's JSON body, if it has one."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _required_fields(model: type[BaseModel]) -> str:
    required = [_describe_field(name, info) for name, info in model.model_fields.items() if info.is_required()]
    return ", ".join(required) if required else "a JSON object (its fields are optional)"


def _describe_field(name: str, info: FieldInfo) -> str:
    """``name``, with its allowed values when it is a choice."""
    if get_origin(info.annotation) is Literal:
        return f"{name} (one of {', '.join(repr(value) for value in get_args(info.annotation))})"
    return name


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_OF_HTTP_STATUS.get(exc.status_code, "invalid_request")
    if code in ("not_found", "method_not_allowed"):
        what = "no such endpoint" if code == "not_found" else "method not allowed"
        return error_response(code, f"{what}: {request.method} {request.url.path[:_PATH_SHOWN_MAX]}")
    if code == "invalid_request" and exc.status_code != 400:
        log.warning("unexpected HTTP error %s answered as 400: %s", exc.status_code, exc.detail)
    return error_response(code, str(exc.detail))


async def _stopped(_: Request, exc: Exception) -> Response:
    return error_response("service_unavailable", f"the billing engine is not running: {exc}")


async def _fenced(_: Request, exc: Exception) -> Response:
    return error_response("shard_moved", f"the shard moved to another node; retry: {exc}")


async def _redis_down(_: Request, exc: Exception) -> Response:
    return error_response("redis_unavailable", f"Redis is unavailable: {type(exc).__name__}")


async def unexpected_response(_: Request, exc: Exception) -> Response:
    """The 500 ``internal_error`` answer to an exception no row of the table takes (it is logged)."""
    log.error("unexpected error answering a request", exc_info=exc)
    return error_response("internal_error", "an unexpected error occurred; it was logged")


Handler = Callable[[Request, Exception], Awaitable[Response]]

HANDLERS: Final[Mapping[type[Exception], Handler]] = {
    ApiError: _api_error,
    InvalidInput: _invalid_input,
    RequestValidationError: _validation,
    StarletteHTTPException: _http_error,
    EngineStopped: _stopped,
    WalIOFailure: _stopped,
    ShardFenced: _fenced,
    RedisDown: _redis_down,
    RedisRefused: _redis_down,
}
"""Every exception type above, by its row of the table (anything else is :func:`unexpected_response`: a 500)."""


async def handled_response(request: Request, exc: Exception) -> Response | None:
    """The answer the app's handlers give ``exc`` (looked up along its MRO, as Starlette does); None: a bug.

    For code that answers requests outside the router (:mod:`tollway.api.hot`), so the same
    exception gets the same answer there.
    """
    for cls in type(exc).__mro__:
        handler = HANDLERS.get(cls)
        if handler is not None:
            return await handler(request, exc)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type above to its row of the table, and anything else to a 500."""
    for exc_type, handler in HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    app.add_exception_handler(Exception, unexpected_response)
