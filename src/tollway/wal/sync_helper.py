"""The WAL sync helper: a small process that calls ``fdatasync`` for the engine.

Started by :class:`tollway.wal.syncer.SyncProcess` as ``python -I -S sync_helper.py <fd>``,
so it imports nothing but the standard library and starts in about 10 ms. ``<fd>`` is its end
of a ``SOCK_SEQPACKET`` socket pair. The protocol, one message each way per sync:

- engine → helper: ``S``, with the segment's descriptor attached (``SCM_RIGHTS``) whenever the
  engine moved to another segment; the helper closes the one it held before;
- helper → engine: ``K`` once ``fdatasync`` returned, or ``E`` followed by the error's text.

It exits when the socket reaches end-of-file: the engine closed it, or the engine's process
died (``kill -9`` included). SIGINT and SIGTERM are ignored: a Ctrl-C at a terminal or a
SIGTERM sent to the whole process group must not take the helper away while the service is
still draining its last batches; the service stops it by closing the socket.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

SYNC = b"S"
OK = b"K"
FAILED = b"E"
MESSAGE_BYTES_MAX = 16
ERROR_TEXT_MAX = 500


def serve(channel: socket.socket) -> None:
    """Answer sync requests until the engine closes its end."""
    fd = -1
    while True:
        message, fds, _, _ = socket.recv_fds(channel, MESSAGE_BYTES_MAX, 1)
        if not message:
            return
        if fds:
            if fd >= 0:
                os.close(fd)
            fd = fds[0]
        try:
            os.fdatasync(fd)
        except OSError as exc:
            reply = FAILED + str(exc).encode(errors="replace")[:ERROR_TEXT_MAX]
        else:
            reply = OK
        try:
            channel.send(reply)
        except OSError:  # the engine is gone: nobody is waiting for the answer
            return


def main(argv: list[str]) -> int:
    """Entry point: ``sync_helper.py <socket descriptor>``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(argv[1])) as channel:
        serve(channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
