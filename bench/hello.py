"""A raw ASGI "hello" on tollway's server stack: what one core answers when a request costs nothing.

``python bench/hello.py --port P`` serves a fixed 2-byte JSON body to every request with the
same stack ``tollway serve`` runs on (uvicorn with httptools and uvloop, no access log, no
lifespan), so ``bench/http.py`` can divide tollway's billing requests per second by this
figure, measured in the same run, on the same core, with the same load generator (issue 21: the
FastAPI ``/healthz`` route is itself a slow ceiling, kept as a second figure).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/http.py would shadow the standard library's http
import uvicorn

BODY: Final = b"{}"
HEADERS: Final = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:  # noqa: ARG001 - the ASGI signature
    """Answer every HTTP request 200 ``{}``."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A raw ASGI hello on uvicorn + httptools + uvloop.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
