"""Folding the log fast: the cyclic garbage collector is paused while a fold runs.

Replaying a WAL builds hundreds of thousands of long-lived, acyclic objects (entries, events,
idempotency records). CPython's cyclic collector would rescan them over and over for nothing;
measured here, pausing it roughly halves the time of a recovery or an audit. Reference
counting still frees everything as usual; only the cycle hunt waits.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the duration of a fold."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
