"""Listening sockets for tollway's HTTP servers (the API and the settlement simulator).

A socket is bound by us, not by uvicorn, so the port is known (and can be 0: a free one)
before the server starts. It is created with ``IPPROTO_TCP`` rather than protocol 0: asyncio
sets ``TCP_NODELAY`` on accepted connections only when the protocol says TCP, and without it
Nagle's algorithm and delayed ACKs add ~40 ms to small responses.
"""

from __future__ import annotations

import errno
import socket
from typing import Final

from tollway.core.errors import ConfigError

LISTEN_BACKLOG: Final = 2048


def bind(host: str, port: int, backlog: int = LISTEN_BACKLOG, *, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port``; ConfigError if it cannot be had.

    ``reuse_port``: ``SO_REUSEPORT``, so several processes listen on one port and the kernel
    spreads new connections over them (``tollway serve --processes``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = "; another process (another tollway?) is listening there: stop it or pick another port"
        taken = exc.errno == errno.EADDRINUSE
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint if taken else ''}") from exc
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
