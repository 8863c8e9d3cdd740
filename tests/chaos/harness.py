"""What the fault tests share: an in-process stack, events whose ids say where they come from, a
real fleet with knobs for killing its processes, and exactly-once checks read from the tables.

Used by ``tests/chaos/`` (marker ``chaos``), the fault tests in ``tests/integration/`` and
``benchmarks/bench_chaos.py``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from common.commit.committer import Committer
from common.coord import keys
from common.coord.backlog import read_backlog
from common.coord.locks import lock_factory
from common.coord.pending import PendingRegistry
from common.ingest.routing import Router, TableName
from common.lake.catalog import TableStore, open_catalog
from common.settings import Settings, load_settings
from common.write.batch_writer import BatchWriter
from tests.pipeline import rust_ids
from workers.fleet import Fleet, ManagedProcess, group_exists

if TYPE_CHECKING:
    import pytest

BASE_TIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
# Fast and small: the tests kill committers, so a dead owner's lock must free quickly.
FAST = {"lock_ttl_ms": 2_000, "lock_wait_s": 30.0, "retry_base_ms": 10, "commit_interval_ms": 1}


# --- in-process ----------------------------------------------------------------------------------


@dataclass
class Stack:
    """One process's icefleet: what a writer and a committer hold, on a real Redis."""

    settings: Settings
    client: redis.Redis
    catalog: Catalog
    registry: PendingRegistry
    writer: BatchWriter
    committer: Committer
    dead: list[Any] = field(default_factory=list)  # dead letters the writer produced

    def table(self, name: str) -> Table:
        return self.catalog.load_table(TableName.parse(name).parts)

    def commit_all(self) -> None:
        for table in sorted(self.committer.pending_tables()):
            self.committer.commit_table(table)

    def close(self) -> None:
        self.client.close()


def make_stack(redis_url: str, home: Path, **overrides: Any) -> Stack:
    settings = load_settings({}, home=home, redis_url=redis_url, **{**FAST, **overrides})
    client = redis.Redis.from_url(redis_url)
    catalog = open_catalog(settings)
    store = TableStore(
        catalog,
        lock_factory(client, settings),
    )
    registry = PendingRegistry(client)
    dead: list[Any] = []
    writer = BatchWriter(
        settings, store, Router(settings.routes, settings.namespace), registry, dead.extend
    )
    committer = Committer(settings, catalog, client, registry)
    return Stack(settings, client, catalog, registry, writer, committer, dead)


# --- events --------------------------------------------------------------------------------------


def make_events(
    prefix: str, count: int, *, types: Sequence[str] = ("com.example.order",), days: int = 1
) -> list[dict[str, Any]]:
    """``count`` CloudEvents with ids ``<prefix>-<n>``, cycling through ``types`` and ``days``."""
    return [
        {
            "specversion": "1.0",
            "id": f"{prefix}-{n}",
            "source": "/tests/chaos",
            "type": types[n % len(types)],
            "time": (BASE_TIME + timedelta(days=n % days, seconds=n))
            .isoformat()
            .replace("+00:00", "Z"),
            "data": {"n": n, "amount": 1.25 * n, "note": f"event {n} of {prefix}"},
        }
        for n in range(count)
    ]


def ndjson(events: Iterable[dict[str, Any]]) -> str:
    return "".join(orjson.dumps(e).decode() + "\n" for e in events)


def expected_by_table(settings: Settings, events: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    router = Router(settings.routes, settings.namespace)
    out: dict[str, list[str]] = {}
    for event in events:
        out.setdefault(str(router.table_for(event["type"])), []).append(event["id"])
    return out


# --- reading back ----------------------------------------------------------------------------------


def ids_in(table: Table, column: str = "id") -> list[str]:
    if table.current_snapshot() is None:
        return []
    return [str(v) for v in table.scan(selected_fields=(column,)).to_arrow().column(column)]


def exactly_once_problems(found: Iterable[str], expected: Iterable[str]) -> list[str]:
    """Missing, duplicated and unexpected ids, as sentences; ``[]`` when each is there once."""
    counts = Counter(found)
    wanted = set(expected)
    problems = []
    missing = sorted(wanted - counts.keys())
    duplicated = sorted(f"{i} x{n}" for i, n in counts.items() if n > 1)
    unexpected = sorted(counts.keys() - wanted)
    for label, items in (
        ("missing", missing),
        ("duplicated", duplicated),
        ("unexpected", unexpected),
    ):
        if items:
            problems.append(f"{len(items)} {label}, e.g. {items[:5]}")
    return problems


def assert_exactly_once(found: Iterable[str], expected: Iterable[str], what: str = "") -> None:
    problems = exactly_once_problems(found, expected)
    assert not problems, f"{what}: " + "; ".join(problems)


def commit_seqs(table: Table) -> list[int]:
    """The commit seq of each snapshot icefleet's committer made, in the table's snapshot order."""
    from common.commit.committer import SEQ_PROPERTY

    return [
        int(s.summary.additional_properties[SEQ_PROPERTY])
        for s in table.snapshots()
        if s.summary is not None and SEQ_PROPERTY in s.summary.additional_properties
    ]


# --- a real fleet ----------------------------------------------------------------------------------

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


# --- chaos rounds ----------------------------------------------------------------------------------

FAULTS = ("writer-child", "writer", "committer")


@dataclass
class ChaosReport:
    """What a chaos run did and found."""

    events_sent: int = 0
    batches_sent: int = 0
    send_retries: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    rows_read: int = 0
    seconds: float = 0.0

    def add(self, other: ChaosReport) -> None:
        self.events_sent += other.events_sent
        self.batches_sent += other.batches_sent
        self.send_retries += other.send_retries
        self.faults.update(other.faults)
        self.rows_read += other.rows_read
        self.seconds += other.seconds

    def describe(self) -> str:
        faults = ", ".join(f"{n} {kind}" for kind, n in sorted(self.faults.items())) or "none"
        rows = f"{self.rows_read:,} rows read back; " if self.rows_read else ""
        return (
            f"{self.events_sent:,} events in {self.batches_sent} batches sent "
            f"({self.send_retries} resends), faults: {faults}; {rows}{self.seconds:.0f}s"
        )


class Feeder:
    """Enqueues batches from a thread at a steady pace, resending a batch (same id) until the
    enqueue succeeds: what a careful producer does while Redis restarts."""

    def __init__(
        self, settings: Settings, batches: list[tuple[str, list[dict[str, Any]]]], interval_s: float
    ) -> None:
        self.settings = settings
        self.batches = batches
        self.interval_s = interval_s
        self.retries = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float = 120) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("the feeder did not finish")
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        from common.ingest.producer import Producer

        producer: Producer | None = None
        try:
            for batch_id, events in self.batches:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        producer = producer or Producer(self.settings)
                        producer.enqueue(events, batch_id=batch_id)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        self.retries += 1
                        if producer is not None:
                            with suppress(Exception):
                                producer.close()
                        producer = None
                        time.sleep(0.3)
                time.sleep(self.interval_s)
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            if producer is not None:
                with suppress(Exception):
                    producer.close()


def round_batches(
    prefix: str, batches: int, per_batch: int, types: Sequence[str]
) -> list[tuple[str, list[dict[str, Any]]]]:
    return [
        (f"{prefix}-{n}", make_events(f"{prefix}-{n}", per_batch, types=types, days=2))
        for n in range(batches)
    ]


def inject(fault: str, fleet: Fleet, client: redis.Redis, rng: Any, report: ChaosReport) -> None:
    """Kill something: a writer's pool process (mid-batch), a whole writer, or the committer
    (mid-commit when one is under way within a second); whole processes are started again."""
    writers = [p for p in fleet.processes if p.name.startswith("writer")]
    if fault == "writer-child":
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not client.hlen(keys.deliveries()):
            time.sleep(0.01)  # a batch is being written
        report.faults[fault] += kill_pool_children(rng.choice(writers))
    elif fault == "writer":
        proc = rng.choice(writers)
        with FLEET_LOCK:
            killed_at = time.time()
            kill_hard(proc)
            report.faults[fault] += 1
            restart(fleet, proc)
        redeliver_unacked(client, before=killed_at)
    elif fault == "committer":
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not pending_or_prepared(client):
            time.sleep(0.005)
        with FLEET_LOCK:
            kill_hard(fleet.process("committer"))
            report.faults[fault] += 1
            restart(fleet, fleet.process("committer"))
    else:
        raise ValueError(f"unknown fault {fault!r}")


def chaos_round(
    fleet: Fleet,
    client: redis.Redis,
    rng: Any,
    *,
    prefix: str,
    batches: int = 30,
    per_batch: int = 200,
    send_s: float = 15.0,
    faults: Sequence[str] = FAULTS,
    min_faults: int = 0,
    types: Sequence[str] = ("com.example.order", "com.example.refund"),
    settle_s: float = 180.0,
    extra: Callable[[ChaosReport], None] | None = None,
) -> tuple[list[dict[str, Any]], ChaosReport]:
    """Send ``batches`` batches over about ``send_s`` seconds while killing processes at random
    (each kind in ``faults`` once, in random order, then mostly pool processes, at least
    ``min_faults`` in all); ``extra`` injects something more, once, halfway. Then wait until
    everything is committed."""
    started = time.monotonic()
    report = ChaosReport()
    planned = round_batches(prefix, batches, per_batch, types)
    feeder = Feeder(fleet.settings, planned, send_s / batches).start()
    first = rng.sample(list(faults), len(faults))
    weights = [3 if kind == "writer-child" else 1 for kind in faults]
    extra_done = extra is None
    injected = 0
    while feeder.alive or (faults and injected < min_faults):
        time.sleep(rng.uniform(0.3, 1.0))
        if not extra_done and time.monotonic() - started > send_s / 2:
            assert extra is not None
            extra(report)
            extra_done = True
        elif faults:
            kind = first.pop() if first else rng.choices(list(faults), weights)[0]
            inject(kind, fleet, client, rng, report)
            injected += 1
    feeder.join()
    if not extra_done and extra is not None:
        extra(report)
    settle(fleet.settings, client, planned, report, settle_s)
    events = [e for _, batch in planned for e in batch]
    report.events_sent, report.batches_sent = len(events), batches
    report.send_retries = feeder.retries
    report.seconds = time.monotonic() - started
    return events, report


def settle(
    settings: Settings,
    client: redis.Redis,
    planned: list[tuple[str, list[dict[str, Any]]]],
    report: ChaosReport,
    timeout_s: float,
    stuck_after_s: float = 20.0,
) -> None:
    """Wait until everything is committed, resending batches whose message was lost.

    kombu's Redis transport takes a message off the queue with BRPOP and records it as unacked
    only once the worker has read the reply: a worker killed in between (or a connection cut
    while the reply travels) loses that message. icefleet keeps such a batch in
    ``icefleet:outstanding`` (``icefleet wait`` names it), and the producer sends it again under
    the same id, as a careful producer does; a lost child batch is recovered by resending its
    root, whose split record hands the child back again.
    """
    from common.ingest.producer import Producer

    by_id = dict(planned)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wait_idle(client, timeout_s=min(stuck_after_s + 5, max(deadline - time.monotonic(), 1)))
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
        now_ms = time.time() * 1000
        stuck = {
            _text(batch).split("~")[0]
            for batch, since in client.zrange(keys.outstanding(), 0, -1, withscores=True)
            if now_ms - since > stuck_after_s * 1000
        }
        stuck &= by_id.keys()
        if stuck:
            with Producer(settings) as producer:
                for batch_id in sorted(stuck):
                    producer.enqueue(by_id[batch_id], batch_id=batch_id)
            report.faults["lost-message-resent"] += len(stuck)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def verify_tables(
    stack: Stack,
    events: Sequence[dict[str, Any]],
    report: ChaosReport,
    *,
    rust_file_io: dict[str, str] | None = None,
) -> None:
    """Every event exactly once, read with pyiceberg (and iceberg-rust when ``rust_file_io`` is
    given), no dead letters, and one snapshot per commit seq."""
    from common.coord.deadletters import DeadLetterStore

    dead = DeadLetterStore(stack.client).list(5)
    assert not dead, f"dead letters: {[(d.batch_id, d.reason) for d in dead]}"
    for name, ids in expected_by_table(stack.settings, events).items():
        table = stack.table(name)
        found = ids_in(table)
        assert_exactly_once(found, ids, f"{name} (pyiceberg)")
        report.rows_read += len(found)
        if rust_file_io is not None:
            assert_exactly_once(rust_ids(table, rust_file_io), ids, f"{name} (iceberg-rust)")
        seqs = commit_seqs(table)
        assert seqs == sorted(set(seqs)), f"{name}: commit seqs {seqs}"
