"""The local fleet: ``redis-server``, Celery writer and committer processes, and Flower, supervised.

Every process is started in a session (so a process group) of its own: Ctrl-C in the terminal
reaches only the CLI, which then stops the fleet in order: the writers first (Celery's warm
shutdown on SIGTERM: no new task, reserved messages put back, and the running batch either
finishes or hands its unwritten rest back as a child batch at the next chunk, see
workers/tasks/write.py), then the committer while Redis is still up (it finishes its commit, or a
prepared record lets the next one finish it), Flower, and Redis last. Whatever does not stop within
:data:`STOP_TIMEOUT_S` gets SIGKILL, with its whole group, so no prefork child or embedded beat is
left behind; a batch it held is delivered again (``acks_late``) and lands once. On Linux the children also get SIGTERM when the
CLI itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.coord.redis_memory import required_maxmemory, warn_about_eviction
from common.errors import MissingDependencyError
from common.settings import Settings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 20.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
REDIS_INSTALL_HINT = (
    "install it with `apt-get install redis-server` (Debian/Ubuntu), `brew install redis` "
    "(macOS) or `dnf install redis` (Fedora), or point ICEFLEET_REDIS_URL at a running Redis"
)
FLOWER_INSTALL_HINT = "install it with `pip install 'flower>=2,<3'` (a dependency of icefleet)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


def group_exists(pgid: int) -> bool:
    """Whether any process (a zombie included) is left in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def redis_server_binary() -> str:
    """The path of ``redis-server``, or :class:`MissingDependencyError` saying how to install it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingDependencyError("redis-server", REDIS_INSTALL_HINT)
    return binary


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class ManagedProcess:
    """One child process in its own process group, restartable."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.started_at = time.monotonic()
        logger.info("started %s (pid %d)", self.name, self.popen.pid)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signum)

    def wait(self, timeout_s: float) -> bool:
        if self.popen is None:
            return True
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill_group(self, timeout_s: float = 5.0) -> None:
        """SIGKILL whatever is left in the process group (prefork children, embedded beat) and
        wait until the group is gone."""
        if self.popen is None:
            return
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        deadline = time.monotonic() + timeout_s
        while group_exists(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # orphaned children are reaped by init

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.signal(signal.SIGTERM)
        if not self.wait(timeout_s):
            logger.warning("%s did not stop within %.0fs; killing it", self.name, timeout_s)
        self.kill_group()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def redis_process(
    home: Path, port: int, maxmemory: int = 0, appendfsync: str = "everysec"
) -> ManagedProcess:
    """``redis-server`` on a loopback port with its AOF and log under ``home/redis``; with a
    ``maxmemory`` (bytes) and ``noeviction``, so overload makes it refuse writes, never be
    killed or drop keys (common/coord/redis_memory.py)."""
    workdir = home / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(), "--port", str(port), "--bind", LOOPBACK, "--dir", str(workdir),
        "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "",
        "--maxmemory", str(maxmemory), "--maxmemory-policy", "noeviction",
        "--protected-mode", "yes", "--daemonize", "no",
    ]  # fmt: skip
    return ManagedProcess("redis", argv, dict(os.environ), workdir / "redis.log")


def wait_for_redis(url: str, proc: ManagedProcess | None, timeout_s: float = 20.0) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc is not None and not proc.alive:
                raise RuntimeError(f"redis-server exited ({proc.returncode}):\n{proc.tail()}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis at {LOOPBACK} not answering after {timeout_s:.0f}s")
            time.sleep(0.1)
    finally:
        client.close()


def generated_basic_auth() -> str:
    """``flower:<random>`` for Flower when no ICEFLEET_FLOWER_BASIC_AUTH is set: its task
    pages show batch ids and tracebacks, so it is never open, not even on 127.0.0.1."""
    return "flower:" + secrets.token_urlsafe(18)


def check_external_redis(settings: Settings) -> None:
    """Warn when a Redis icefleet did not start could evict its keys or grow unbounded."""
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        warn_about_eviction(client, settings.budget)
    finally:
        client.close()


@dataclass
class Fleet:
    """Redis (unless one is configured), ``writers`` writer processes, a committer, Flower."""

    settings: Settings
    writers: int = 2
    spawn_redis: bool = True
    flower: bool = False
    flower_port: int = 5555
    pool: str = "prefork"
    loglevel: str = "INFO"
    processes: list[ManagedProcess] = field(default_factory=list)
    redis: ManagedProcess | None = None
    # user:password Flower requires (ICEFLEET_FLOWER_BASIC_AUTH, else generated at start)
    flower_auth: str | None = field(default=None, repr=False)
    _stopping: bool = False
    _backoff_until: dict[str, float] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.settings.home.resolve()

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def worker_names(self) -> list[str]:
        return [f"writer{i}" for i in range(1, self.writers + 1)] + ["committer"]

    def child_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ICEFLEET_REDIS_URL": self.settings.redis_url,
            "ICEFLEET_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        """Start everything; raise if a piece cannot start (what was started is stopped)."""
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            if self.spawn_redis:
                port = free_port()
                self.redis = redis_process(
                    self.home,
                    port,
                    maxmemory=required_maxmemory(self.settings.budget),
                    # a 202 that waits for the disk (ICEFLEET_ACK_DURABILITY=fsync)
                    appendfsync="always" if self.settings.ack_durability == "fsync" else "everysec",
                )
                self.settings = replace(self.settings, redis_url=f"redis://{LOOPBACK}:{port}/0")
                self.redis.start()
                wait_for_redis(self.settings.redis_url, self.redis)
            else:
                wait_for_redis(self.settings.redis_url, None)
                check_external_redis(self.settings)
            if self.flower:
                self._check_flower()
                self.flower_auth = self.settings.flower_basic_auth or generated_basic_auth()
            for name in self.worker_names():
                self._add(name, self._worker_argv(name))
            if self.flower:
                self._add("flower", self._flower_argv(), self.flower_env())
        except BaseException:
            self.stop()
            raise

    def _add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        env = env or self.child_env()
        proc = ManagedProcess(name, argv, env, self.log_dir / f"{name}.log")
        self.processes.append(proc)
        proc.start()

    def _worker_argv(self, name: str) -> list[str]:
        role = "committer" if name == "committer" else "writer"
        return [
            sys.executable, "-m", "workers.cli.main", "worker", role, "--name", name,
            "--pool", self.pool, "--loglevel", self.loglevel,
        ]  # fmt: skip

    def _flower_argv(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "workers.app", "flower",
            f"--address={LOOPBACK}", f"--port={self.flower_port}",
        ]  # fmt: skip

    def flower_env(self) -> dict[str, str]:
        """Flower's environment: its basic auth travels here, not in argv (which ``ps`` shows
        to every local user); Flower reads ``FLOWER_*`` variables as its options."""
        assert self.flower_auth is not None
        return {**self.child_env(), "FLOWER_BASIC_AUTH": self.flower_auth}

    def _check_flower(self) -> None:
        import importlib.util

        if importlib.util.find_spec("flower") is None:
            raise MissingDependencyError("Flower", FLOWER_INSTALL_HINT)
        if port_in_use(self.flower_port):
            raise RuntimeError(f"port {self.flower_port} is in use: Flower cannot listen there")

    def wait_ready(
        self, timeout_s: float = 60.0, on_tick: Callable[[], None] | None = None
    ) -> None:
        """Block until every worker answers a ping (raise if one dies or the timeout passes)."""
        from workers.app import create_app

        app = create_app(self.settings)
        expected = set(self.worker_names())
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                for proc in self.processes:
                    if not proc.alive:
                        raise RuntimeError(
                            f"{proc.name} exited ({proc.returncode}) while starting; "
                            f"its log {proc.log_path}:\n{proc.tail()}"
                        )
                # limit: return as soon as every worker answered, not after the whole timeout
                replies = app.control.ping(timeout=0.5, limit=len(expected)) or []
                seen = {name.split("@", 1)[0] for reply in replies for name in reply}
                if expected <= seen:
                    return
                if on_tick is not None:
                    on_tick()
                if time.monotonic() > deadline:
                    missing = ", ".join(sorted(expected - seen))
                    raise TimeoutError(f"workers not ready after {timeout_s:.0f}s: {missing}")
        finally:
            app.close()

    def supervise_once(self) -> list[str]:
        """Restart processes that died (with a growing pause); return what was restarted."""
        restarted = []
        now = time.monotonic()
        for proc in [p for p in (self.redis, *self.processes) if p is not None]:
            if proc.alive or self._stopping or now < self._backoff_until.get(proc.name, 0.0):
                continue
            if proc.name in self._backoff_until:
                self._backoff_until.pop(proc.name)
                proc.kill_group()
                proc.restarts += 1
                proc.start()
                restarted.append(proc.name)
                continue
            pause = RESTART_BACKOFF_S[min(proc.restarts, len(RESTART_BACKOFF_S) - 1)]
            if now - proc.started_at > 60:
                pause = RESTART_BACKOFF_S[0]  # it ran for a while: a fresh failure
            logger.warning(
                "%s exited with %s; restarting in %.0fs", proc.name, proc.returncode, pause
            )
            self._backoff_until[proc.name] = now + pause
        return restarted

    def process(self, name: str) -> ManagedProcess:
        """The managed process called ``name`` (``writer1``, ``committer``, ``flower``)."""
        for proc in self.processes:
            if proc.name == name:
                return proc
        raise KeyError(name)

    def stop(self, *, idle: bool = False) -> None:
        """Stop everything that was started, gracefully: writers, then the committer and Flower,
        then Redis. Idempotent.

        ``idle``: the caller knows nothing is in flight (every batch committed, as at the end
        of ``icefleet demo``), so the workers are stopped all at once: the order only matters
        for what a writer finishes while stopping, which the committer must still be up for.
        """
        self._stopping = True
        writers = [p for p in self.processes if p.name.startswith("writer")]
        others = [p for p in self.processes if p not in writers]
        for group in ([*writers, *others],) if idle else (writers, others):
            stop_gracefully(group)
        if self.redis is not None:
            self.redis.stop()


def stop_gracefully(processes: list[ManagedProcess], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM each process, wait for all up to ``timeout_s`` together, then SIGKILL each group."""
    for proc in processes:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        if not proc.wait(max(0.1, deadline - time.monotonic())):
            logger.warning("%s did not stop within %.0fs; killing it", proc.name, timeout_s)
        proc.kill_group()


@contextmanager
def signals_raise_keyboard_interrupt() -> Iterator[None]:
    """Treat SIGTERM and SIGHUP like Ctrl-C while the fleet runs, so cleanup always happens.

    SIGINT is handled explicitly too: a shell without job control starts background commands
    with SIGINT ignored, and Python then never raises KeyboardInterrupt.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, handler) for s in handled}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
