"""Metrics: a registry per Metrics object, a Redis that cannot be reached, and what the worker
hooks count from task results. No server: the gauges read from a live Redis are in
tests/integration/test_metrics_redis.py."""

from __future__ import annotations

import pytest
import redis

from common.observe.metrics import create_metrics
from common.wire import COMMIT_TASK, WRITE_TASK
from tests.support.metrics import samples
from workers.observability import record_task

pytestmark = pytest.mark.unit


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


def test_unreachable_redis_is_reported_not_raised() -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from tests.support.services import free_port

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
