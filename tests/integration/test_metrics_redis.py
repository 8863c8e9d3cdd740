"""Metrics gauges read from the real Redis at scrape: backlog, pending, freshness, dead letters,
the canary's last result. The session's real redis-server (``redis_client``): the pending
registry runs Lua, which fakeredis does not without its ``lupa`` extra."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis

from common.coord import keys
from common.coord.deadletters import DeadLetterStore
from common.coord.pending import PendingRegistry
from common.ingest.events import DeadLetter
from common.observe.metrics import CANARY_LAST_KEY, create_metrics
from tests.support.metrics import samples

pytestmark = pytest.mark.integration

NOW_S = 1_800_000_000.0


def test_redis_state_is_read_at_scrape(redis_client: redis.Redis) -> None:
    # Given two batches outstanding, one pending for a table, a commit 90 s ago, a dead letter
    redis_client.zadd(keys.outstanding(), {"b1": (NOW_S - 30) * 1000, "b2": NOW_S * 1000})
    registry = PendingRegistry(redis_client)
    registry.register("events.order", "b0", orjson.dumps({"records": 1}).decode())
    registry.finish_commit("events.click", ["old"], committed_ms=int((NOW_S - 90) * 1000))
    DeadLetterStore(redis_client).add([DeadLetter("b9", 0, "id: missing", "id", b"{}")])
    redis_client.rpush("ingest", b"message")
    metrics = create_metrics(redis_client, clock=lambda: NOW_S)

    # When it is scraped
    got = samples(metrics.render())

    # Then the gauges say so
    assert got[("icefleet_redis_up", ())] == 1
    assert got[("icefleet_outstanding_batches", ())] == 2
    assert got[("icefleet_oldest_outstanding_age_seconds", ())] == pytest.approx(30)
    assert got[("icefleet_pending_batches", (("table", "events.order"),))] == 1
    assert got[("icefleet_queue_messages", (("queue", "ingest"),))] == 1
    assert got[("icefleet_dead_letters", ())] == 1
    assert got[("icefleet_freshness_lag_seconds", (("table", "events.click"),))] == pytest.approx(
        90
    )
    assert got[("icefleet_last_commit_timestamp_seconds", (("table", "events.click"),))] == (
        pytest.approx(NOW_S - 90)
    )
    assert ("icefleet_canary_ok", ()) not in got  # no probe yet

    # ... and a new commit moves the freshness at the next scrape
    registry.finish_commit("events.click", ["new"], committed_ms=int((NOW_S - 2) * 1000))
    got = samples(metrics.render())
    assert got[("icefleet_freshness_lag_seconds", (("table", "events.click"),))] == pytest.approx(2)


@pytest.mark.parametrize(
    ("result", "ok", "seconds"),
    [
        ({"status": "ok", "latency_s": 2.5, "checked_ms": 1_000}, 1, 2.5),
        ({"status": "timeout", "latency_s": None, "checked_ms": 1_000}, 0, None),
    ],
)
def test_canary_result_becomes_gauges(
    redis_client: redis.Redis, result: dict[str, Any], ok: int, seconds: float | None
) -> None:
    redis_client.set(CANARY_LAST_KEY, orjson.dumps(result))
    got = samples(create_metrics(redis_client).render())
    assert got[("icefleet_canary_ok", ())] == ok
    assert got.get(("icefleet_canary_last_seconds", ())) == seconds
    assert got[("icefleet_canary_last_timestamp_seconds", ())] == 1.0
