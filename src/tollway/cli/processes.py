"""``tollway serve --postgres-url URL --processes N``: N cluster nodes on one machine, one port.

One Python process serves on one core. To use every core of a machine, the parent starts ``N``
children, each a full cluster node (``tollway serve --postgres-url``: its own node id
``<node-id>-<i>``, its own leases, engines and connection pool), all listening on the same port
with ``SO_REUSEPORT``, so the kernel spreads new connections over them. A request reaching a
child that does not own its shard is forwarded like any other; since the shared port may lead
to any child, each child also listens on a private port of the same address and advertises
that one to the cluster (:func:`tollway.cli.node.serve_node`).

The parent holds the port (bound with ``SO_REUSEPORT`` but not listening, so it receives no
connection) for the children's whole life, so a restarted child gets the same port back. The
PostgreSQL URL reaches the children through their environment, not their command line.

**Supervision.** A child that exits while the parent runs, whatever its status, is restarted
under the same node id after a pause (:data:`RESTART_DELAYS_MS`, longer after each death). Its
shards meanwhile move as a dead node's do: once their leases expire another node (a sibling,
or another machine) acquires and serves them, and when the child is back the assignment gives
it its share again through graceful hand-offs. A child that dies more than
:data:`RESTARTS_MAX` times within :data:`RESTART_WINDOW_MS` is a fault a restart does not fix
(a bad configuration, a database that refuses it): the parent then stops every child and exits
with status 1, saying why, so the service manager above it sees the failure.

**Stopping.** SIGTERM or SIGINT to the parent sends SIGTERM to every child; each hands its
shards off gracefully (last batch finished, snapshot row written, lease released) and exits;
the parent exits 0 once all did so cleanly (children still running after
:data:`STOP_TIMEOUT_MS` are killed, and the exit status is 1). If the parent itself dies,
Linux sends each child SIGTERM (``PR_SET_PDEATHSIG``), with the same hand-off. Children run in
their own process group, so a Ctrl-C reaches only the parent, which stops them once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import typer

from tollway.cli.node import NodeOptions
from tollway.config import Settings
from tollway.core.errors import ConfigError
from tollway.pg.process import die_with_parent

PROCESSES_MAX: Final = 64
POLL_MS: Final = 100  # how often the parent looks at its children
RESTART_DELAYS_MS: Final = (1_000, 2_000, 5_000, 10_000, 30_000)  # after the 1st, 2nd, ... death in the window
RESTARTS_MAX: Final = 5  # deaths of one child within the window that the parent restarts
RESTART_WINDOW_MS: Final = 300_000
STOP_TIMEOUT_MS: Final = 60_000  # for every child to hand its shards off after SIGTERM


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening: it keeps the port for the children."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        taken = "; another process is listening there" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{taken}") from exc
    return sock


@dataclass(frozen=True, slots=True)
class ChildOptions:
    """What the parent's command line passes on to every child, besides the node's own options."""

    config: Path | None = None
    log_level: str = "info"
    log_format: str = "auto"
    access_log: bool = False
    redis_url: str | None = None
    settlement_url: str | None = None


def serve_processes(
    settings: Settings, holder: socket.socket, count: int, node: NodeOptions, extra: ChildOptions
) -> int:
    """Run ``count`` nodes on the port ``holder`` keeps, supervised, until a stop signal; the exit status."""
    host, port = holder.getsockname()[:2]
    base = node.node_id or f"node-{uuid.uuid4().hex[:8]}"
    children = [
        Child(f"{base}-{i}", _child_argv(settings, f"{base}-{i}", host=host, port=port, node=node, extra=extra))
        for i in range(count)
    ]
    typer.echo(f"tollway: cluster mode, {count} nodes sharing {host}:{port} ({', '.join(c.node_id for c in children)})")
    try:
        return Supervisor(children, child_environment(node.postgres_url), typer.echo, _warn).run()
    finally:
        holder.close()


def _child_argv(
    settings: Settings, node_id: str, *, host: str, port: int, node: NodeOptions, extra: ChildOptions
) -> list[str]:
    """``tollway serve`` of one child: the shared port, its node id, the parent's options (not the URL: see the env)."""
    argv = [sys.executable, "-m", "tollway.cli", "serve", "--reuse-port", "--host", host, "--port", str(port)]
    argv += ["--data-dir", str(settings.data_dir), "--node-id", node_id, "--lease-ttl-ms", str(node.lease_ttl_ms)]
    argv += ["--log-level", extra.log_level, "--log-format", extra.log_format]
    argv += ["--access-log"] if extra.access_log else []
    argv += ["--config", str(extra.config)] if extra.config is not None else []
    argv += ["--redis-url", extra.redis_url] if extra.redis_url is not None else []
    argv += ["--settlement-url", extra.settlement_url] if extra.settlement_url is not None else []
    return argv


@dataclass(slots=True)
class Child:
    """One node process: its node id, its command line, and its deaths within the window."""

    node_id: str
    argv: list[str]
    popen: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None  # monotonic seconds; set while it waits to be restarted
    deaths: list[float] = field(default_factory=list)  # monotonic seconds of its recent deaths


class Supervisor:
    """Runs the children, restarts the ones that die, and stops them all on a signal; see the module docstring."""

    def __init__(
        self,
        children: list[Child],
        env: dict[str, str],
        echo: Callable[[str], None],
        warn: Callable[[str], None],
        *,
        delays_ms: tuple[int, ...] = RESTART_DELAYS_MS,
        restarts_max: int = RESTARTS_MAX,
    ) -> None:
        self.children = children
        self.env = env
        self.echo = echo
        self.warn = warn  # deaths and giving up: loud, on stderr
        self.delays_ms = delays_ms
        self.restarts_max = restarts_max
        self.stopping = False
        self.gave_up = False

    def run(self) -> int:
        """Until SIGTERM/SIGINT (or a child that keeps dying): the exit status of the whole."""
        with self._signals():
            for child in self.children:
                self._spawn(child)
            while not self.stopping:
                now = time.monotonic()
                for child in self.children:
                    self._look_after(child, now)
                time.sleep(POLL_MS / 1000)
            return self._stop_all()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _spawn(self, child: Child) -> None:
        child.restart_at = None
        child.popen = subprocess.Popen(  # noqa: S603 -- this interpreter running tollway; no shell
            child.argv,
            env=self.env,
            process_group=0,  # a Ctrl-C reaches the parent only, which stops each child once
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - system calls only
        )
        self.echo(f"tollway: node {child.node_id} started (pid {child.popen.pid})")

    def _look_after(self, child: Child, now: float) -> None:
        """Notice a death and schedule the restart; restart when it is due; give up on a child that keeps dying."""
        if child.popen is not None and child.popen.poll() is not None:
            status = child.popen.returncode
            child.popen = None
            child.deaths = [*(t for t in child.deaths if now - t < RESTART_WINDOW_MS / 1000), now]
            if len(child.deaths) > self.restarts_max:
                self.warn(
                    f"tollway: node {child.node_id} exited ({_status(status)}) {len(child.deaths)} times within "
                    f"{RESTART_WINDOW_MS // 1000} s; stopping every node (a restart does not fix this)"
                )
                self.gave_up = self.stopping = True
                return
            delay_ms = self.delays_ms[min(len(child.deaths), len(self.delays_ms)) - 1]
            self.warn(f"tollway: node {child.node_id} exited ({_status(status)}); restarting it in {delay_ms} ms")
            child.restart_at = now + delay_ms / 1000
        if child.popen is None and child.restart_at is not None and now >= child.restart_at:
            self._spawn(child)

    def _stop_all(self) -> int:
        """SIGTERM every child, wait for their hand-offs, kill the ones that outlast the timeout."""
        running = [child.popen for child in self.children if child.popen is not None and child.popen.poll() is None]
        for popen in running:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
        self.echo(f"tollway: stopping {len(running)} nodes (each hands its shards off)")
        deadline = time.monotonic() + STOP_TIMEOUT_MS / 1000
        clean = True
        for popen in running:
            try:
                status = popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                status = popen.wait()
            clean = clean and status == 0
        return 0 if clean and not self.gave_up else 1


def _warn(message: str) -> None:
    typer.echo(message, err=True)


def _status(returncode: int) -> str:
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


def child_environment(postgres_url: str) -> dict[str, str]:
    """The children's environment: this one, with the PostgreSQL URL (kept off their command lines)."""
    return {**os.environ, "TOLLWAY_POSTGRES_URL": postgres_url}
