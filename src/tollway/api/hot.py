"""The hot path: the gateway's billing routes answered before FastAPI's router.

A gateway calls reserve and commit (or release) around every model call, so those requests are
most of the traffic. Answering them through FastAPI costs more than authenticating, parsing and
executing them together: matching, the request object, solving the dependencies, two exit
stacks and two exception wrappers per request, and before all that the middleware stack every
request crosses (Starlette's and FastAPI's error and telemetry wrappers, FastAPI's body limit,
tollway's own), each wrapping ``receive`` and ``send`` again (``bench/http.py`` and a profile of
``tollway serve`` under load show it). :class:`HotPath` sits in front of the whole app
(:class:`~tollway.api.app.TollwayAPI` calls it first) and answers ``POST`` on

- ``/v1/reservations`` and ``/v1/charges``,
- ``/v1/reservations/{billing_entry_id}/commit``, ``/release`` and ``/extend``

with the same parts the routes use, minus the machinery: the bearer token as
:class:`~fastapi.security.HTTPBearer` reads it and the same :class:`Authenticator` and scope; the
route's own pydantic model, validating the raw body in JSON mode; the same command builder
(:data:`~tollway.api.routes_billing.GATEWAY_COMMANDS`); the same :func:`entry_outcome`.

The invariant: **the hot path only answers a request the app would answer the same way**.
Whatever it does not take as it is — no bearer token, a content type other than
``application/json``, no ``Content-Length`` or one over the body limit, a token or an account
refused, a body that does not validate, a ``root_path`` — goes to the app unchanged, with the
body it read replayed, and gets the answer it always got (413 and error bodies included). A
request is never handed over after its command reached the engine: from there on, an exception
gets the error table's answer here (:func:`~tollway.api.errors.handled_response`), and anything
else the app's 500 answer (:func:`~tollway.api.errors.unexpected_response`) before it is
raised on to the server, as the app's outermost middleware does.
"""

from __future__ import annotations

from typing import Final

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.api.auth import Scope as TokenScope
from tollway.api.context import AppContext
from tollway.api.errors import ApiError, handled_response, unexpected_response
from tollway.api.limits import parse_length
from tollway.api.routes_billing import GATEWAY_COMMANDS, entry_outcome
from tollway.core.errors import InvalidInput

RESERVATIONS: Final = "/v1/reservations"
CHARGES: Final = "/v1/charges"
_ONE_RESERVATION: Final = RESERVATIONS + "/"
_ACTIONS: Final = frozenset({"commit", "release", "extend"})
_JSON: Final = b"application/json"
_BODY_UNREADABLE: Final = "There was an error parsing the body"  # FastAPI's words for the same failure


def match(path: str) -> tuple[str, str] | None:
    """``(route name, billing entry id or "")`` of a hot path; None for every other path."""
    if path == RESERVATIONS:
        return "reserve", ""
    if path == CHARGES:
        return "charge", ""
    if path.startswith(_ONE_RESERVATION):
        entry_id, slash, action = path[len(_ONE_RESERVATION) :].partition("/")
        if entry_id and slash and action in _ACTIONS:
            return action, entry_id
    return None


def request_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bool, int | None]:
    """The bearer token, whether the body is declared ``application/json``, and its declared length.

    One pass over the headers. The token as HTTPBearer reads it: the first Authorization header,
    ``Bearer <credentials>`` with the scheme in any case. The first Content-Type counts,
    parameters allowed; the first Content-Length, as the body limit reads it.
    """
    token: str | None = None
    authorization = content_type = length = None
    for name, value in headers:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
            scheme, _, param = authorization.partition(" ")
            credentials = param.strip()
            token = credentials if scheme and credentials and scheme.lower() == "bearer" else None
        elif name == b"content-type" and content_type is None:
            content_type = value
        elif name == b"content-length" and length is None:
            length = value
    is_json = content_type is not None and content_type.partition(b";")[0] == _JSON
    return token, is_json, None if length is None else parse_length(length)


async def read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The request body, and the message that cut it short (a disconnect), if one did."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks), None


def replaying(body: bytes, cut: Message | None, receive: Receive) -> Receive:
    """``receive`` as it was before :func:`read_body` took the body from it."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": cut is not None}]
    if cut is not None:
        pending.append(cut)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class HotPath:
    """Answer the gateway's billing routes directly; hand everything else to ``app`` unchanged.

    ``limit_bytes`` is the app's body limit: a body declared larger (or not declared) is the
    app's to refuse, so the hot path never reads more than the limit.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a hot route, or pass the request on (replaying a body already read)."""
        found = match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        token, is_json, declared = request_headers(scope["headers"]) if found is not None else (None, False, None)
        fits = declared is not None and declared <= self.limit_bytes
        if found is None or token is None or not is_json or not fits or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        try:
            body, cut = await read_body(receive)
        except Exception as exc:  # noqa: BLE001 - FastAPI answers any failure to read the body with this 400
            await _answer_error(scope, receive, send, HTTPException(400, _BODY_UNREADABLE), exc)
            return
        try:
            response = None if cut is not None else await answer(scope, found, token, body)
        except Exception as exc:
            await (await unexpected_response(Request(scope), exc))(scope, receive, send)
            raise
        if response is None:
            await self.app(scope, replaying(body, cut, receive), send)
            return
        await response(scope, receive, send)


async def answer(scope: Scope, found: tuple[str, str], token: str, body: bytes) -> Response | None:
    """The response to a hot route; None when the router should answer it (nothing was executed)."""
    ctx: AppContext = scope["app"].state.tollway
    name, entry_id = found
    model, command_of = GATEWAY_COMMANDS[name]
    try:
        principal = ctx.authenticator.authenticate(token)
        principal.require(TokenScope.GATEWAY)
        command = await command_of(ctx, principal, model.model_validate_json(body), entry_id)
    except (ApiError, InvalidInput, ValidationError):
        return None
    try:
        return entry_outcome(await ctx.engine.execute(command))
    except Exception as exc:
        response = await handled_response(Request(scope), exc)
        if response is None:
            raise
        return response


async def _answer_error(
    scope: Scope, receive: Receive, send: Send, exc: Exception, cause: Exception | None = None
) -> None:
    response = await handled_response(Request(scope), exc)
    if response is None:  # pragma: no cover - HTTPException is always in the table
        raise exc from cause
    await response(scope, receive, send)
