"""The identity of a data directory: a random id made once, kept in ``<wal>/IDENTITY``.

Whatever a data directory's engine writes elsewhere (the Redis projection, its finalize
stream) is marked with this id, so a second engine pointed at the same Redis prefix and shard
finds another owner and refuses to touch it (SPEC §7, CLUSTER.md §5). The file is created
under the WAL's single-writer lock, atomically (written, synced, renamed, directory synced);
it never changes afterwards, and a copy of the data directory (a restored backup) keeps it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

from tollway.core.errors import WalError
from tollway.wal.snapshot import fsync_dir

IDENTITY_FILE: Final = "IDENTITY"
_FORMAT: Final = re.compile(r"[0-9a-f]{32}")


def data_identity(wal_dir: Path, *, durable: bool = True) -> str:
    """The data directory's id, created on first use. Call it while holding the WAL lock."""
    path = wal_dir / IDENTITY_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return _create(path, durable=durable)
    except (OSError, UnicodeDecodeError) as exc:
        raise WalError(f"cannot read the data directory's identity {path}: {exc}") from exc
    if not _FORMAT.fullmatch(text):
        raise WalError(f"{path} does not hold a data directory identity (32 hex digits); restore it from a backup")
    return text


def _create(path: Path, *, durable: bool) -> str:
    identity = os.urandom(16).hex()
    scratch = path.with_name(IDENTITY_FILE + ".tmp")
    with scratch.open("w", encoding="ascii") as handle:
        handle.write(identity + "\n")
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    scratch.replace(path)
    if durable:
        fsync_dir(path.parent)
    return identity
