"""Atomic, checksummed snapshots of the engine state.

A snapshot file ``snapshot-<sequence, 20 digits>.snap`` in ``<data_dir>/snapshots/`` is::

    offset 0    16 bytes            SNAPSHOT_MAGIC (name and format version)
    offset 16   u64 little-endian   the WAL sequence the state includes
    offset 24   u64 little-endian   body length N
    offset 32   u32 little-endian   CRC-32 of bytes 0..31 followed by the body
    offset 36   N bytes             msgpack of :class:`tollway.core.state.Snapshot`

It is written to a temporary name, fsynced, renamed into place and the directory fsynced,
so a reader sees a whole snapshot or none. Recovery takes the newest snapshot whose checksum
holds and replays the WAL after it; a damaged snapshot is skipped, never trusted. Snapshots
are a cache of the WAL, so old ones are deleted; WAL segments never are.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from tollway.core.state import Snapshot, State

SNAPSHOT_MAGIC: Final = b"TOLLWAY-SNAP\x00\x00\x00\x01"
_HEADER: Final = struct.Struct("<16sQQ")
_NAME_RE: Final = re.compile(r"snapshot-(\d{20})\.snap")
SNAPSHOT_WRITE_CHUNK_BYTES: Final = 1 << 20
"""A snapshot is written and flushed this much at a time (see :func:`write_snapshot`)."""
SNAPSHOT_PAIRS_PER_CHUNK: Final = 2_000
"""Entries encoded per slice (about 1.5 ms): the engine yields to callers between slices."""
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(Snapshot)


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    """A snapshot that passed its checks, and the files that did not."""

    state: State
    sequence: int
    path: Path | None
    skipped: tuple[str, ...]


def snapshot_name(sequence: int) -> str:
    """File name of the snapshot at ``sequence``."""
    return f"snapshot-{sequence:020d}.snap"


def encode_snapshot(state: State) -> bytes:
    """The complete snapshot file contents for ``state`` at its current sequence (in one go)."""
    return frame_snapshot(state.last_sequence, [_ENCODER.encode(state.to_snapshot())])


def frame_snapshot(sequence: int, body_chunks: Sequence[bytes]) -> bytes:
    """The whole snapshot file for a msgpack body given in pieces."""
    return b"".join([_frame_header(sequence, body_chunks), *body_chunks])


def _map_header(count: int) -> bytes:
    """The msgpack header of a map with ``count`` pairs."""
    if count < 16:
        return bytes([0x80 | count])
    if count < 1 << 16:
        return b"\xde" + count.to_bytes(2, "big")
    return b"\xdf" + count.to_bytes(4, "big")


def _bin_header(size: int) -> bytes:
    """The msgpack header of a bin (bytes) of ``size`` bytes."""
    return b"\xc6" + size.to_bytes(4, "big")


def _whole_bytes(value: bytes | memoryview) -> bytes:
    """``value`` as bytes: the object a view covers whole (what ``State.freeze`` makes), else a copy."""
    if isinstance(value, memoryview):
        whole = value.obj
        return whole if isinstance(whole, bytes) and len(whole) == value.nbytes else value.tobytes()
    return value


def snapshot_chunks(snap: Snapshot, pairs_per_chunk: int = SNAPSHOT_PAIRS_PER_CHUNK) -> Iterator[bytes]:
    """The msgpack body of ``snap`` in pieces, so a caller can encode it a slice at a time.

    The result, joined, is exactly what :func:`msgspec.msgpack.encode` would give: a map of the
    snapshot's fields, the large dicts written as one map header followed by their pairs,
    each slice encoded natively as a small dict whose own header is cut off.
    """
    fields = Snapshot.__struct_fields__
    yield _map_header(len(fields))
    for name in fields:
        yield _ENCODER.encode(name)
        value = getattr(snap, name)
        if isinstance(value, bytes | memoryview) and len(value) > pairs_per_chunk:  # the settled table: not copied
            yield _bin_header(len(value))
            yield _whole_bytes(value)
            continue
        if not isinstance(value, dict) or len(value) <= pairs_per_chunk:
            yield _ENCODER.encode(value)
            continue
        yield _map_header(len(value))
        items = iter(value.items())
        while piece := dict(itertools.islice(items, pairs_per_chunk)):
            yield _ENCODER.encode(piece)[len(_map_header(len(piece))) :]


def decode_snapshot(data: bytes) -> tuple[int, Snapshot]:
    """Check and decode a snapshot file; raises ``ValueError`` when it is not sound."""
    if len(data) < _HEADER.size + 4:
        raise ValueError("shorter than its header")
    magic, sequence, length = _HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise ValueError("not a tollway snapshot")
    body = memoryview(data)[_HEADER.size + 4 :]
    if len(body) != length:
        raise ValueError(f"body is {len(body)} bytes, header says {length}")
    crc = int.from_bytes(data[_HEADER.size : _HEADER.size + 4], "little")
    if zlib.crc32(body, zlib.crc32(data[: _HEADER.size])) != crc:
        raise ValueError("checksum mismatch")
    snap = _DECODER.decode(body)
    if snap.last_sequence != sequence:
        raise ValueError("sequence in body differs from header")
    return sequence, snap


def fsync_dir(path: Path) -> None:
    """Fsync a directory so a create, rename or delete in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(
    snap_dir: Path, sequence: int, data: bytes | Sequence[bytes], *, keep: int, durable: bool = True
) -> Path:
    """Write a snapshot atomically; keep the newest ``keep``. Blocking: call it from a thread.

    ``data`` is a whole file (from :func:`encode_snapshot`) or the msgpack body in pieces (from
    :func:`snapshot_chunks`), which are framed here — the checksum of hundreds of megabytes is
    computed in this thread, not on the event loop.
    """
    pieces = [data] if isinstance(data, bytes) else [_frame_header(sequence, data), *data]
    final = snap_dir / snapshot_name(sequence)
    for stale in snap_dir.glob(".snapshot-*.snap.tmp"):  # left by a crash mid-write; never valid
        stale.unlink(missing_ok=True)
    tmp = snap_dir / f".{final.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_flushing(fd, pieces, durable)
    finally:
        os.close(fd)
    tmp.replace(final)
    for old in list_snapshots(snap_dir)[:-keep]:
        old.unlink(missing_ok=True)
    if durable:
        fsync_dir(snap_dir)
    return final


def _write_flushing(fd: int, pieces: Sequence[bytes], durable: bool) -> None:
    """Write ``pieces``, flushing every ``SNAPSHOT_WRITE_CHUNK_BYTES`` when durable.

    A WAL fdatasync commits the filesystem journal, which on ext4 must first write out other
    files' dirty data: a snapshot's hundreds of megabytes left dirty would stall WAL syncs.
    """
    unflushed = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            written = os.write(fd, view[:SNAPSHOT_WRITE_CHUNK_BYTES])
            view, unflushed = view[written:], unflushed + written
            if durable and unflushed >= SNAPSHOT_WRITE_CHUNK_BYTES:
                os.fdatasync(fd)
                unflushed = 0
    if durable:
        os.fsync(fd)


def _frame_header(sequence: int, body_chunks: Sequence[bytes]) -> bytes:
    """Header and checksum of a snapshot whose body is ``body_chunks`` joined."""
    header = _HEADER.pack(SNAPSHOT_MAGIC, sequence, sum(len(chunk) for chunk in body_chunks))
    crc = zlib.crc32(header)
    for chunk in body_chunks:
        crc = zlib.crc32(chunk, crc)
    return header + crc.to_bytes(4, "little")


def list_snapshots(snap_dir: Path) -> list[Path]:
    """Snapshot files, oldest first."""
    if not snap_dir.is_dir():
        return []
    return sorted(path for path in snap_dir.iterdir() if _NAME_RE.fullmatch(path.name))


def load_newest(snap_dir: Path, *, max_sequence: int | None = None) -> LoadedSnapshot:
    """The newest sound snapshot (at most ``max_sequence``), or an empty state."""
    skipped: list[str] = []
    for path in reversed(list_snapshots(snap_dir)):
        try:
            sequence, snap = decode_snapshot(path.read_bytes())
        except FileNotFoundError:  # deleted by the engine's rotation since it was listed
            continue
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        if max_sequence is not None and sequence > max_sequence:
            skipped.append(f"{path.name}: sequence {sequence} is beyond the end of the WAL ({max_sequence})")
            continue
        return LoadedSnapshot(State.from_snapshot(snap), sequence, path, tuple(skipped))
    return LoadedSnapshot(State(), 0, None, tuple(skipped))
