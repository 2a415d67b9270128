"""The supervisor of ``tollway serve --processes``: restart a dying child, give up on one that keeps dying, stop all.

Real child processes (small Python programs standing in for nodes), real signals; the pauses
between restarts are shortened.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from tollway.cli.processes import Child, Supervisor

pytestmark = pytest.mark.timeout(60)

SLEEPER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "open(sys.argv[1], 'a').write('up\\n')\n"
    "time.sleep(60)\n"
)


def program(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def test_a_child_that_keeps_dying_is_restarted_then_the_parent_gives_up_with_status_1(tmp_path: Path) -> None:
    """A child exiting at once: restarted restarts_max times, then every child is stopped and the status is 1."""
    warnings: list[str] = []
    healthy = tmp_path / "healthy"
    dying = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\nsys.exit(3)\n"
    children = [Child("n-0", program(dying, str(healthy))), Child("n-1", program(SLEEPER, str(healthy)))]
    supervisor = Supervisor(
        children, dict(os.environ), lambda _: None, warnings.append, delays_ms=(10,), restarts_max=3
    )
    status = supervisor.run()
    assert 1 == status
    assert 3 == sum("n-0 exited (status 3); restarting it in 10 ms" in line for line in warnings)
    assert "n-0 exited (status 3) 4 times" in warnings[-1]
    assert children[1].popen is not None
    assert 0 == children[1].popen.returncode  # the healthy one was stopped with SIGTERM and exited cleanly


def test_sigterm_to_the_parent_stops_every_child_and_a_killed_child_was_restarted(tmp_path: Path) -> None:
    """kill -9 of a child: it is started again; SIGTERM to the parent: each child gets SIGTERM, status 0."""
    marks = [tmp_path / "a", tmp_path / "b"]
    children = [Child(f"n-{i}", program(SLEEPER, str(mark))) for i, mark in enumerate(marks)]
    warnings: list[str] = []
    supervisor = Supervisor(children, dict(os.environ), lambda _: None, warnings.append, delays_ms=(10,))

    def chaos() -> None:
        deadline = threading.Event()
        while not all(mark.exists() for mark in marks):
            deadline.wait(0.02)
        first = children[1].popen
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        while marks[1].read_text().count("up") < 2:
            deadline.wait(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=chaos)
    thread.start()
    status = supervisor.run()
    thread.join()
    assert 0 == status
    assert ["n-1 exited (signal SIGKILL); restarting it in 10 ms"] == [
        w.removeprefix("tollway: node ") for w in warnings
    ]
    assert (1, 2) == (marks[0].read_text().count("up"), marks[1].read_text().count("up"))
