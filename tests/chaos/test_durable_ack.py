"""Durability of an acknowledgement: with ``ICEFLEET_ACK_DURABILITY=fsync`` (Redis with
``appendfsync always``), Redis killed with ``kill -9`` under load loses no acknowledged event.

A producer thread enqueues batch after batch, each once, recording which were acknowledged
(``enqueue`` returned) and which failed (Redis gone: unknown outcome, never retried). Redis is
killed mid-run and started again on its AOF; the fleet's own recovery (the sweep sending lost
messages again after ``ICEFLEET_RESEND_AFTER``, the visibility timeout fast-forwarded as in the
other chaos tests) does the rest: no producer resends anything. Then every acknowledged event is
in the table exactly once (iceberg-rust), and no failed one twice.

What this cannot show: ``kill -9`` of the Redis process leaves what it wrote in the kernel's page
cache, so ``everysec`` would pass it too; only a host crash (power loss) tells the two apart,
which no test here can cause. The setting's cost is measured by ``python -m benchmarks overload``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from common.ingest.producer import Producer
from tests.support.events import make_events
from tests.support.fleet import (
    environment,
    fleet_env,
    redeliver_unacked,
    running_fleet,
    settings_for,
    supervised,
    wait_idle,
)
from tests.support.readback import rust_ids
from tests.support.services import RedisProcess, wait_until
from tests.support.stack import make_stack

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(480)]

PER_BATCH = 50
TYPE = "com.example.durable"


class Sender:
    """Enqueues batches ``dur-<n>`` one after another until stopped; never resends one."""

    def __init__(self, settings: object) -> None:
        self.settings = settings
        self.acked: list[str] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        producer: Producer | None = None
        n = 0
        while not self._stop.is_set():
            batch_id = f"dur-{n}"
            n += 1
            try:
                producer = producer or Producer(self.settings)  # type: ignore[arg-type]
                producer.enqueue(make_events(batch_id, PER_BATCH, types=(TYPE,)), batch_id=batch_id)
                self.acked.append(batch_id)
            except Exception:
                self.failed.append(batch_id)
                if producer is not None:
                    producer.close()
                producer = None
                time.sleep(0.2)
        if producer is not None:
            producer.close()

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_kill_9_of_redis_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    # Given a fleet on a Redis that fsyncs every write, producers asking for durable acks
    server = RedisProcess(tmp_path / "redis", appendfsync="always")
    server.start()
    env = fleet_env(
        ICEFLEET_REDIS_URL=server.url,
        ICEFLEET_HOME=str(tmp_path / "home"),
        ICEFLEET_ACK_DURABILITY="fsync",
        ICEFLEET_RESEND_AFTER="5s",
    )
    client = redis.Redis.from_url(server.url)
    try:
        with environment(env), running_fleet(settings_for(env)) as fleet, supervised(fleet):
            with Sender(fleet.settings) as sender:
                # When Redis is killed (SIGKILL) while batches are acknowledged, and started again
                wait_until(lambda: len(sender.acked) >= 20, timeout_s=120, what="20 acks")
                acked_before = len(sender.acked)
                killed_at = time.time()
                server.stop(kill=True)
                # Redis stays down until a send has failed (not for a fixed time: the producer's
                # own reconnect retries may outlast a short outage on a slow machine)
                wait_until(lambda: bool(sender.failed), timeout_s=120, what="a failed send")
                server.start()
                wait_until(
                    lambda: len(sender.acked) >= acked_before + 20,
                    timeout_s=120,
                    what="acks again",
                )
            time.sleep(3.0)
            redeliver_unacked(client, before=killed_at)
            wait_idle(client, timeout_s=240)

        # Then every acknowledged event is in the table exactly once; none landed twice
        stack = make_stack(server.url, tmp_path / "home")
        try:
            found = Counter(rust_ids(stack.table("events.durable"), {}))
        finally:
            stack.close()
        acked = {f"{b}-{i}" for b in sender.acked for i in range(PER_BATCH)}
        missing = acked - found.keys()
        assert not missing, (
            f"{len(missing)} acknowledged events missing, e.g. {sorted(missing)[:3]}"
        )
        assert max(found.values()) == 1
        assert sender.failed, "Redis was killed while the producer sent: some sends must fail"
        print(
            f"\nkill -9 with fsync acks: {len(sender.acked)} batches acknowledged "
            f"({len(acked)} events), {len(sender.failed)} failed sends, 0 missing, 0 doubled"
        )
    finally:
        client.close()
        server.stop()
