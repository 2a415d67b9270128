"""The request-body limit: bodies over ``http_body_bytes_max`` get 413 before anything parses them.

An ASGI middleware in front of the whole app:

- a ``Content-Length`` over the limit is answered 413 at once — the app is not called and the
  body is never read;
- a body without a usable length (chunked) is counted as it arrives; the chunk that crosses
  the limit raises :class:`BodyTooLarge` (an HTTP 413 exception) inside the app's read, so
  the parser never sees a byte past the limit and the error table answers.

Nothing else is inspected here: the content is the schemas' business.
"""

from __future__ import annotations

from typing import Final

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.api.errors import error_response

PAYLOAD_TOO_LARGE: Final = 413
_LENGTH_DIGITS_MAX: Final = 18  # any longer Content-Length is over every limit; counting catches it


class BodyTooLarge(HTTPException):
    """The body crossed the limit while it was being read."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(PAYLOAD_TOO_LARGE, f"the request body is larger than {limit_bytes} bytes")


class BodyLimit:
    """Refuse request bodies larger than ``limit_bytes`` (413 ``payload_too_large``)."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 for a declared oversize body; count an undeclared one as it is read."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.limit_bytes:
            message = f"the request body ({declared} bytes) is larger than {self.limit_bytes} bytes"
            await error_response("payload_too_large", message)(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        limit = self.limit_bytes
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return counted


def content_length(scope: Scope) -> int | None:
    """The request's declared ``Content-Length``; None when there is none or it is not a plain number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return parse_length(value)
    return None


def parse_length(value: bytes) -> int | None:
    """A ``Content-Length`` header's value as a number; None when it is not a plain one."""
    text = value.decode("latin-1").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= _LENGTH_DIGITS_MAX else None
