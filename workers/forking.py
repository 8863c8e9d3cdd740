"""Child processes of the local fleet: forked from the CLI after one preload, or spawned, and
the process groups they run in.

A worker forked from the CLI process (:func:`fork_cli`) starts without importing anything: the
CLI imported what workers need once (:func:`preload_worker_modules`). Three workers each
importing pyiceberg, pyarrow and Celery for a second on a 2-core machine were most of
``icefleet demo``'s start (docs/cli.md). A fork is only safe with no other thread running
(:func:`can_fork`); otherwise, and for restarts, workers are fresh interpreters.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import NoReturn, Protocol


def group_exists(pgid: int) -> bool:
    """Whether a live process is left in the process group (zombies do not count).

    A zombie has exited and holds nothing but its exit status; one whose parent exited first
    (a prefork pool process finishing its exit as its worker leaves) waits for init to reap
    it, which in some containers happens only every second or two: waiting for that would
    only slow down stopping. Without /proc, any process in the group counts.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = group_states(pgid)
    return members is None or any(state not in ("Z", "X") for state in members)


def group_states(pgid: int) -> list[str] | None:
    """The states (``R``, ``S``, ``Z``...) of the processes in group ``pgid``; None without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    states = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            states.append(fields[0])
    return states


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


#: What a worker process imports before it answers a ping, beyond the CLI: its tasks and their
#: libraries, Celery's worker, prefork pool and beat, the Redis transport. A fleet that forks its
#: workers imports these once, in its own process, instead of once per worker
#: (:func:`preload_worker_modules`).
WORKER_MODULES = (
    "workers.app",
    "workers.tasks",
    "workers.observability",
    "celery.apps.worker",
    "celery.apps.beat",
    "celery.beat",
    "celery.worker.worker",
    "celery.worker.consumer",
    "celery.worker.components",
    "celery.worker.autoscale",
    "celery.worker.pidbox",
    "celery.worker.heartbeat",
    "celery.worker.control",
    "celery.concurrency.prefork",
    "celery.concurrency.asynpool",
    "celery.concurrency.solo",
    "celery.events.dispatcher",
    "kombu.transport.redis",
)

#: ``run(args)`` runs the ``icefleet`` command line with ``args`` (``["worker", "writer", ...]``)
#: in this process: what a forked worker calls (the CLI's click group).
CliMain = Callable[[list[str]], object]


class Child(Protocol):
    """The part of :class:`subprocess.Popen` the fleet uses (also :class:`ForkedChild`)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


def preload_worker_modules() -> None:
    """Import what a worker needs before it is ready (:data:`WORKER_MODULES`, the catalog's
    lazily imported backends), so that workers forked from this process start without
    importing anything: ~1 s of CPU per worker otherwise, 3 workers on 2 cores."""
    from common.lake.catalog import preload_catalog_modules

    for name in WORKER_MODULES:
        importlib.import_module(name)
    preload_catalog_modules()


def can_fork() -> bool:
    """Whether forking this process is safe: POSIX, and no other thread that could hold a lock
    (of logging, of a stream's buffer, of the import system) the child would inherit held."""
    return hasattr(os, "fork") and threading.active_count() == 1


class ForkedChild:
    """A child made with :func:`os.fork`, waited for like a :class:`subprocess.Popen`.

    ``wait`` blocks on a pidfd (Linux >= 5.3) instead of polling, so a stopping fleet notices a
    worker's exit at once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone, its status unknown
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        pidfd = _pidfd(self.pid)
        try:
            while (code := self.poll()) is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
                if pidfd is not None:
                    select.select([pidfd], [], [], left)  # readable once the child has exited
                else:
                    time.sleep(0.01 if left is None else min(0.01, left))
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        return None


def fork_cli(run: CliMain, args: list[str], env: dict[str, str], log_path: Path) -> ForkedChild:
    """Run ``icefleet ARGS`` in a forked copy of this process, as ``subprocess.Popen`` would run
    it in a fresh one: a session of its own, stdin from /dev/null, stdout and stderr to
    ``log_path``, the environment ``env``, default signal handlers. Never returns in the child."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()  # or the child writes this process's buffered output into its log
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; covered by the fleet tests
            _run_forked(run, args, env, log)
    finally:
        os.close(log)
    return ForkedChild(pid)


def _run_forked(run: CliMain, args: list[str], env: dict[str, str], log: int) -> NoReturn:
    code: object = 1
    try:
        os.setsid()
        die_with_parent()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        # New stream objects on the redirected descriptors: line-buffered and writing through,
        # as PYTHONUNBUFFERED gives a fresh process, and nothing inherited half-written.
        for fd, name in ((1, "stdout"), (2, "stderr")):
            stream = open(  # noqa: SIM115 - the process's own stream, never closed
                fd, "w", buffering=1, closefd=False, errors="backslashreplace"
            )
            stream.reconfigure(write_through=True)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["icefleet", *args]
        run(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        with suppress(Exception):
            traceback.print_exc()
    finally:
        for std in (sys.stdout, sys.stderr):
            with suppress(Exception):
                std.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
