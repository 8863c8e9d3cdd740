"""Chaos rounds against a real fleet: batches fed from a thread while processes are killed at
random, then everything settled and read back (``tests/chaos/`` and ``benchmarks/bench_chaos.py``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import redis

from common.coord import keys
from common.settings import Settings
from tests.support.events import make_events
from tests.support.fleet import (
    FLEET_LOCK,
    kill_hard,
    kill_pool_children,
    pending_or_prepared,
    redeliver_unacked,
    restart,
    wait_idle,
)
from tests.support.readback import assert_landed_once, assert_one_snapshot_per_seq
from tests.support.stack import Stack
from workers.fleet import Fleet

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
    prefix: str, batches: int, per_batch: int, types: Sequence[str], repeats: int = 0
) -> list[tuple[str, list[dict[str, Any]]]]:
    """The batches of a round; with ``repeats``, each batch after the first also carries the
    first ``repeats`` events of the batch before it (same bytes, so in flight in two batches)."""
    planned = [
        (f"{prefix}-{n}", make_events(f"{prefix}-{n}", per_batch, types=types, days=2))
        for n in range(batches)
    ]
    return [
        (batch_id, events + (planned[n - 1][1][:repeats] if n else []))
        for n, (batch_id, events) in enumerate(planned)
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
    repeats: int = 0,
) -> tuple[list[dict[str, Any]], ChaosReport]:
    """Send ``batches`` batches over about ``send_s`` seconds while killing processes at random
    (each kind in ``faults`` once, in random order, then mostly pool processes, at least
    ``min_faults`` in all); ``extra`` injects something more, once, halfway. Then wait until
    everything is committed."""
    started = time.monotonic()
    report = ChaosReport()
    planned = round_batches(prefix, batches, per_batch, types, repeats)
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
            (batch.decode() if isinstance(batch, bytes) else str(batch)).split("~")[0]
            for batch, since in client.zrange(keys.outstanding(), 0, -1, withscores=True)
            if now_ms - since > stuck_after_s * 1000
        }
        stuck &= by_id.keys()
        if stuck:
            with Producer(settings) as producer:
                for batch_id in sorted(stuck):
                    producer.enqueue(by_id[batch_id], batch_id=batch_id)
            report.faults["lost-message-resent"] += len(stuck)


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
    from tests.support.events import expected_by_table

    dead = DeadLetterStore(stack.client).list(5)
    assert not dead, f"dead letters: {[(d.batch_id, d.reason) for d in dead]}"
    report.rows_read += assert_landed_once(
        stack.catalog, stack.settings, events, rust_file_io=rust_file_io
    )
    for name in expected_by_table(stack.settings, events):
        assert_one_snapshot_per_seq(stack.table(name))
