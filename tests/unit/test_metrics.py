"""Metrics: a registry per Metrics object, gauges read from Redis at scrape, and what the worker
hooks count from task results. Redis is the session's real redis-server (``redis_client``)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from common.coord import keys
from common.coord.deadletters import DeadLetterStore
from common.coord.pending import PendingRegistry
from common.ingest.events import DeadLetter
from common.observe.metrics import CANARY_LAST_KEY, create_metrics
from common.wire import COMMIT_TASK, WRITE_TASK
from workers.observability import record_task

pytestmark = pytest.mark.unit

NOW_S = 1_800_000_000.0


def samples(payload: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(payload.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_each_metrics_object_has_its_own_registry() -> None:
    # Given two Metrics objects in one process (no global registry: no name clash)
    first, second = create_metrics(), create_metrics()

    # When one counts
    first.events_accepted.labels("events.order").inc(3)

    # Then only its exposition shows it
    assert (
        samples(first.render())[("icefleet_events_accepted_total", (("table", "events.order"),))]
        == 3
    )
    assert ("icefleet_events_accepted_total", (("table", "events.order"),)) not in samples(
        second.render()
    )


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


def test_unreachable_redis_is_reported_not_raised() -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from tests.services import free_port

    client = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0), socket_timeout=1)
    got = samples(create_metrics(client).render())
    assert got[("icefleet_redis_up", ())] == 0
    assert ("icefleet_outstanding_batches", ()) not in got


def test_write_task_results_are_counted() -> None:
    metrics = create_metrics()
    payload = '{"id":"1"}\n{"id":"2"}\n{"id":"3"}\n'
    kwargs = {"batch_id": "b", "payload": payload, "table": "events.order"}

    # a batch written with one invalid event, one retried, one dead-lettered whole
    record_task(WRITE_TASK, kwargs, {"records": 2, "dead_letters": 1}, "SUCCESS", 0.2, metrics)
    record_task(WRITE_TASK, kwargs, None, "RETRY", 0.1, metrics)
    record_task(
        WRITE_TASK, {**kwargs, "table": None}, {"dead_lettered": "x"}, "SUCCESS", 0.1, metrics
    )

    got = samples(metrics.render())
    assert got[("icefleet_batches_total", (("outcome", "written"),))] == 1
    assert got[("icefleet_batches_total", (("outcome", "retried"),))] == 1
    assert got[("icefleet_batches_total", (("outcome", "dead_lettered"),))] == 1
    assert got[("icefleet_batch_bytes_total", ())] == len(payload)
    assert got[("icefleet_events_dead_lettered_total", (("table", "events.order"),))] == 1
    assert got[("icefleet_events_dead_lettered_total", (("table", "unrouted"),))] == 3
    assert got[("icefleet_batch_write_seconds_count", ())] == 2  # the two that finished


def test_commit_task_results_are_counted() -> None:
    metrics = create_metrics()
    commits = [
        {"table": "events.order", "records": 1_000, "ms": 120, "recovered": False},
        {"table": "events.order", "records": 500, "ms": 80, "recovered": True},
    ]
    record_task(COMMIT_TASK, {}, commits, "SUCCESS", 0.3, metrics)
    record_task(COMMIT_TASK, {}, None, "FAILURE", 0.3, metrics)

    got = samples(metrics.render())
    assert got[("icefleet_events_written_total", (("table", "events.order"),))] == 1_500
    # a recovered commit's time is the recovery's, not a commit's: not observed
    assert got[("icefleet_commit_seconds_count", (("table", "events.order"),))] == 1
    assert got[("icefleet_commit_seconds_sum", (("table", "events.order"),))] == pytest.approx(0.12)
