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

Started from the CLI (``Fleet(fork_with=...)``), the workers are forked from the CLI process
after it imported what they need once (:mod:`workers.forking`),
not started as fresh interpreters: three workers each importing pyiceberg, pyarrow and
Celery for a second on a 2-core machine were most of ``icefleet demo``'s start. See
docs/cli.md for the demo's phases and their timings.
"""

from __future__ import annotations

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
from workers.forking import (
    Child,
    CliMain,
    can_fork,
    die_with_parent,
    fork_cli,
    group_exists,
    preload_worker_modules,
)

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 20.0
#: How long one round of :meth:`Fleet.wait_ready` waits for the pings' answers.
PING_ROUND_S = 0.2
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


def redis_server_binary() -> str:
    """The path of ``redis-server``, or :class:`MissingDependencyError` saying how to install it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingDependencyError("redis-server", REDIS_INSTALL_HINT)
    return binary


@dataclass
class ManagedProcess:
    """One child process in its own process group, restartable.

    ``cli``: the process is ``icefleet CLI...`` (``argv`` runs it in a fresh interpreter); with
    ``fork_with``, :meth:`start` forks it from this process instead (:func:`fork_cli`), once:
    restarts always run ``argv``, since by then this process may hold threads or connections.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: Child | None = None
    started_at: float = 0.0
    restarts: int = 0
    cli: list[str] | None = None
    fork_with: CliMain | None = None
    _terminated: bool = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._terminated = False
        if self.cli is not None and self.fork_with is not None and can_fork():
            run, self.fork_with = self.fork_with, None
            self.popen = fork_cli(run, self.cli, self.env, self.log_path)
            how = "forked"
        else:
            with self.log_path.open("ab") as log:
                self.popen = subprocess.Popen(
                    self.argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            how = "started"
        self.started_at = time.monotonic()
        logger.info("%s %s (pid %d)", how, self.name, self.popen.pid)

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

    def terminate(self) -> None:
        """SIGTERM, once: Celery's warm shutdown. (A second SIGTERM would only repeat the
        request; the fleet may terminate a worker early and stop it later.)"""
        if not self._terminated:
            self._terminated = True
            self.signal(signal.SIGTERM)

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
        self.terminate()
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
    """Redis (unless one is configured), ``writers`` writer processes, a committer, Flower.

    ``fork_with``: the CLI's entry point; the workers are then forked from this process once it
    has imported what they need (:func:`preload_worker_modules`), instead of each importing it
    all again in a fresh interpreter. Only for a process with no other thread (the CLI, not a
    test runner), and only at :meth:`start`: restarts run a fresh interpreter.
    """

    settings: Settings
    writers: int = 2
    spawn_redis: bool = True
    flower: bool = False
    flower_port: int = 5555
    pool: str = "prefork"
    loglevel: str = "INFO"
    fork_with: CliMain | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    redis: ManagedProcess | None = None
    # user:password Flower requires (ICEFLEET_FLOWER_BASIC_AUTH, else generated at start)
    flower_auth: str | None = field(default=None, repr=False)
    #: seconds from :meth:`start` until each worker first answered a ping (:meth:`wait_ready`)
    ready_after_s: dict[str, float] = field(default_factory=dict)
    _stopping: bool = False
    _backoff_until: dict[str, float] = field(default_factory=dict)
    _started_at: float = 0.0

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
        """Start everything at once; raise if a piece cannot start (what was started is stopped).

        Nothing waits for anything here: Redis and the workers start together (a worker waits
        for Redis itself, ``icefleet worker`` allows :data:`workers.cli.main.STARTUP_WAIT_S`),
        then Redis is waited for, so a Redis that cannot start is reported with its log. The
        workers are waited for by :meth:`wait_ready`.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        self._started_at = time.monotonic()
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
            else:
                wait_for_redis(self.settings.redis_url, None)
                check_external_redis(self.settings)
            if self.flower:
                self._check_flower()
                self.flower_auth = self.settings.flower_basic_auth or generated_basic_auth()
            if self.fork_with is not None and can_fork():
                preload_worker_modules()  # while redis-server starts
            for name in self.worker_names():
                self._add(name, self._worker_argv(name), cli=self._worker_cli(name))
            if self.flower:
                self._add("flower", self._flower_argv(), self.flower_env())
            if self.redis is not None:
                wait_for_redis(self.settings.redis_url, self.redis)
        except BaseException:
            self.stop()
            raise

    def _add(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cli: list[str] | None = None,
    ) -> None:
        env = env or self.child_env()
        proc = ManagedProcess(
            name, argv, env, self.log_dir / f"{name}.log", cli=cli, fork_with=self.fork_with
        )
        self.processes.append(proc)
        proc.start()

    def _worker_cli(self, name: str) -> list[str]:
        """The ``icefleet`` arguments of worker ``name``."""
        role = "committer" if name == "committer" else "writer"
        return [
            "worker", role, "--name", name, "--pool", self.pool, "--loglevel", self.loglevel,
        ]  # fmt: skip

    def _worker_argv(self, name: str) -> list[str]:
        """Worker ``name`` in a fresh interpreter."""
        return [sys.executable, "-m", "workers.cli.main", *self._worker_cli(name)]

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
        """Block until every worker has answered a ping (raise if one dies or the timeout passes).

        A ping is a broadcast on the control channel that a worker answers from its event loop,
        so an answer means it consumes its queue. Rounds are short (:data:`PING_ROUND_S`): a
        round returns as soon as every worker answered, and one that a worker still starting
        misses costs that long, not a second. :attr:`ready_after_s` records when each answered.
        """
        from workers.app import create_app

        app = create_app(self.settings)
        expected = set(self.worker_names())
        seen: set[str] = set()
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
                replies = app.control.ping(timeout=PING_ROUND_S, limit=len(expected)) or []
                now = time.monotonic()
                for name in {name.split("@", 1)[0] for reply in replies for name in reply}:
                    if name in expected and name not in seen:
                        seen.add(name)
                        self.ready_after_s[name] = now - (self._started_at or now)
                if expected <= seen:
                    return
                if on_tick is not None:
                    on_tick()
                if now > deadline:
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

    def terminate_workers(self) -> None:
        """Ask every worker to stop now, all at once, and return without waiting: for a caller
        that knows nothing is in flight (``icefleet demo`` once all is committed), so that the
        workers' shutdown (a prefork pool takes a second or two to wind down) overlaps what
        the caller still does with Redis and the catalog. :meth:`stop` then waits for them."""
        self._stopping = True
        for proc in self.processes:
            proc.terminate()


def stop_gracefully(processes: list[ManagedProcess], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM each process, wait for all up to ``timeout_s`` together, then SIGKILL each group."""
    for proc in processes:
        proc.terminate()
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
