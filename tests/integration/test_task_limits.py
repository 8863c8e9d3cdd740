"""Per-task time limits on real Celery workers: a commit task outlives a tiny write timeout.

A fleet runs with ``ICEFLEET_WRITE_TIMEOUT_S=2``. The table's lock is held from here for longer
than that while a batch waits to be committed, so the committer's commit task waits for the
lock: under a global limit, Celery's soft limit would interrupt it after 2 s.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import redis

from common.coord.locks import TableLock
from common.ingest.producer import Producer
from common.settings import Settings, load_settings
from tests.support.events import make_events
from tests.support.fleet import running_fleet
from workers.app import create_app
from workers.limits import visibility_timeout_s

pytestmark = pytest.mark.integration

TABLE = "events.limits_probe"
HOLD_S = 6.0


def fleet_settings(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, home: Path, **env: str
) -> Settings:
    """Settings from the environment the fleet's processes inherit (restored after the test)."""
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
    values = {
        "ICEFLEET_REDIS_URL": redis_url,
        "ICEFLEET_HOME": str(home),
        "ICEFLEET_COMMIT_INTERVAL_MS": "300",
        "ICEFLEET_CANARY_INTERVAL_S": "0",
        **env,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def test_the_broker_channel_takes_the_restore_options(redis_url: str, tmp_path: Path) -> None:
    # Given an app on the real Redis
    settings = load_settings({}, redis_url=redis_url, home=tmp_path / "home")
    app = create_app(settings)

    # When kombu opens a channel, Then it carries the visibility timeout and the restore pace
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        assert channel.visibility_timeout == visibility_timeout_s(settings)
        assert channel.unacked_restore_throttle == 1
        assert connection.transport_options["unacked_restore_interval"] == 10


def test_a_commit_task_is_not_cut_short_by_a_tiny_write_timeout(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a fleet whose write timeout is 2 s, and a table that exists already
    settings = fleet_settings(
        monkeypatch,
        redis_url,
        tmp_path / "home",
        ICEFLEET_WRITE_TIMEOUT_S="2",
        ICEFLEET_LOCK_WAIT_S="60",
    )
    with running_fleet(settings, writers=1, log_lines=30) as fleet:
        with Producer(settings) as producer:
            producer.enqueue(
                make_events("first", 3, types=("com.example.limits_probe",)), batch_id="first"
            )
            assert producer.wait(timeout_s=60).done
            routed = redis_client.zrange(f"icefleet:committed:{TABLE}", 0, -1)
            assert routed == [b"first"], "the events are routed to another table than expected"

            # When a batch is written while the table's lock is held for longer than that
            with TableLock(redis_client, TABLE, ttl_ms=3_000, wait_s=10):
                producer.enqueue(
                    make_events("second", 3, types=("com.example.limits_probe",)), batch_id="second"
                )
                time.sleep(HOLD_S)
                assert redis_client.hexists(f"icefleet:pending:{TABLE}", "second")

            # Then the commit task that waited for the lock commits it once the lock is free
            assert producer.wait(timeout_s=30).done
        log = (fleet.log_dir / "committer.log").read_text()

    # ... not interrupted by a soft time limit, having run longer than the write timeout
    assert "Soft time limit" not in log, log[-3000:]
    assert "TimeLimitExceeded" not in log, log[-3000:]
    took = [
        float(s)
        for s in re.findall(r"icefleet\.commit_table\[[^\]]+\] succeeded in ([0-9.]+)s", log)
    ]
    assert took and max(took) > 2 + 1, log[-3000:]
