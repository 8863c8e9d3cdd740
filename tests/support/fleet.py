"""A fleet of real worker processes (``icefleet worker`` subprocesses, the way ``icefleet up``
runs them) for tests: its environment, starting and reaping it, waiting until it is idle, and
killing and restarting its parts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from common.coord import keys
from common.coord.backlog import read_backlog
from common.settings import Settings, load_settings
from workers.fleet import Fleet, ManagedProcess
from workers.forking import group_exists

if TYPE_CHECKING:
    import pytest

#: Held while a process is killed and restarted, and by the supervisor: never both at once.
FLEET_LOCK = threading.RLock()


def wait_idle(client: redis.Redis, timeout_s: float, settle_s: float = 1.0) -> None:
    """Until nothing is outstanding, pending, prepared or queued for ``settle_s`` in a row.

    The global picture, stricter than ``Producer.wait`` (which follows the batches enqueued
    before it was called, and their split children): chaos tests also want every queue empty
    and no prepared commit left, for ``settle_s`` in a row.
    """
    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None
    last = ""
    while time.monotonic() < deadline:
        try:
            backlog = read_backlog(client)
        except redis.RedisError as exc:
            last, idle_since = f"Redis: {exc}", None
            time.sleep(0.5)
            continue
        if backlog.idle:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= settle_s:
                return
        else:
            idle_since, last = None, backlog.describe()
        time.sleep(0.2)
    raise TimeoutError(f"not idle after {timeout_s:.0f}s: {last}")


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (a Celery worker's pool processes), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_pool_children(proc: ManagedProcess) -> int:
    """SIGKILL the pool processes of a worker (the ones running tasks); return how many died.

    The worker's main process sees them die and, with ``task_reject_on_worker_lost``, puts the
    message they were running back on the queue at once.
    """
    killed = 0
    if proc.pid is None:
        return 0
    for pid in child_pids(proc.pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def kill_hard(proc: ManagedProcess) -> None:
    """SIGKILL a worker and everything in its process group, and wait until they are gone."""
    proc.kill_group()


def redeliver_unacked(client: redis.Redis, before: float | None = None) -> int:
    """Put back on their queues the messages delivered before ``before`` (epoch seconds, default
    now) and never acknowledged: what kombu does by itself once the visibility timeout has passed.

    A worker that dies whole (its main process too) or loses Redis under a task leaves its message
    in kombu's ``unacked`` hash, and it is delivered again only after the visibility timeout
    (longer than any task may run: at least 62 s here) and kombu's restore sweep. The tests don't
    wait that long: they call this once the worker is known dead. A message still being worked
    on elsewhere may be delivered twice meanwhile, which the exactly-once machinery must absorb.
    """
    from kombu import Connection

    ceiling = time.time() if before is None else before
    tags = [
        tag
        for tag, score in client.zrange("unacked_index", 0, -1, withscores=True)
        if score <= ceiling
    ]
    if not tags:
        return 0
    url = client.connection_pool.connection_kwargs
    broker = f"redis://{url.get('host', '127.0.0.1')}:{url.get('port', 6379)}/{url.get('db', 0)}"
    with Connection(broker) as conn:
        channel = conn.default_channel
        for tag in tags:
            channel.qos.restore_by_tag(tag.decode() if isinstance(tag, bytes) else tag)
    return len(tags)


def fleet_env(**extra: str) -> dict[str, str]:
    """Environment variables for a fleet whose faults must heal in seconds, not minutes."""
    env = {
        "ICEFLEET_LOCK_TTL_MS": "3000",
        "ICEFLEET_COMMIT_INTERVAL_MS": "300",
        "ICEFLEET_RETRY_BASE_MS": "50",
        "ICEFLEET_CANARY_INTERVAL_S": "0",
    }
    env.update(extra)
    return env


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def settings_for(env: dict[str, str]) -> Settings:
    """The settings the fleet's processes load from ``env`` (on top of this process's)."""
    with environment(env):
        return load_settings()


def fleet_config(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, home: Path, **extra: str
) -> tuple[dict[str, str], Settings]:
    """The environment of a test's fleet (:func:`fleet_env`: on ``redis_url``, everything else
    under ``home``, plus ``extra``) and the settings it loads; ``ICEFLEET_CATALOG`` is unset, so
    the catalog is the embedded SQLite one."""
    env = fleet_env(ICEFLEET_REDIS_URL=redis_url, ICEFLEET_HOME=str(home), **extra)
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
    return env, settings_for(env)


@contextmanager
def running_fleet(
    settings: Settings,
    writers: int = 2,
    ready_s: float = 90,
    *,
    log_lines: int | None = None,
    check_reaped: bool = False,
) -> Iterator[Fleet]:
    """A fleet on ``settings`` (its Redis given, not spawned), stopped and reaped afterwards.

    Afterwards the last ``log_lines`` lines of each process's log are printed (default:
    ``$CHAOS_LOG_LINES`` or 25); ``check_reaped`` also asserts that every process exited and
    left nothing in its process group.
    """
    fleet = Fleet(settings, writers=writers, spawn_redis=False)
    try:
        fleet.start()
        fleet.wait_ready(timeout_s=ready_s)
        yield fleet
    finally:
        fleet.stop()
        for proc in fleet.processes:
            lines = int(os.environ.get("CHAOS_LOG_LINES", "25")) if log_lines is None else log_lines
            print(f"--- {proc.name} (exit {proc.returncode}) ---\n{proc.tail(lines)}")
        if check_reaped:
            assert all(proc.returncode is not None for proc in fleet.processes)
            assert all(not group_exists(proc.pid) for proc in fleet.processes if proc.pid)


def restart(fleet: Fleet, proc: ManagedProcess, on_tick: Callable[[], None] | None = None) -> None:
    """Start a dead worker again (same name, same log) and wait until every worker answers."""
    proc.kill_group()
    proc.restarts += 1
    proc.start()
    for attempt in range(5):
        try:
            fleet.wait_ready(timeout_s=90, on_tick=on_tick)
            return
        except Exception:  # the broker connection of the ping itself failed: ask again
            if attempt == 4:
                raise
            time.sleep(1.0)


@contextmanager
def supervised(fleet: Fleet, every_s: float = 0.5) -> Iterator[list[str]]:
    """Restart fleet processes that die, as ``icefleet up`` (and compose's restart policy) does;
    yields the names restarted so far."""
    restarted: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            with FLEET_LOCK, suppress(Exception):
                restarted.extend(fleet.supervise_once())

    thread = threading.Thread(target=loop, name="supervisor", daemon=True)
    thread.start()
    try:
        yield restarted
    finally:
        stop.set()
        thread.join(10)


def pending_or_prepared(client: redis.Redis) -> bool:
    return bool(client.scard(keys.pending_tables())) or any(
        True for _ in client.scan_iter(match=keys.prepared("*"), count=100)
    )
