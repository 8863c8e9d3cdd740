"""The canary, in this process: its tasks called directly on the real Redis, the writer and the
committer tasks run in-process on the embedded SQLite catalog, no worker processes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from common.observe.metrics import create_metrics
from common.settings import load_settings
from common.wire import CANARY_TASK, WRITE_TASK
from tests.support.metrics import samples
from workers.app import canary_schedule, create_app
from workers.observability import process_metrics
from workers.runtime import Runtime
from workers.tasks.canary import (
    CANARY_TABLE,
    CHECK_TASK,
    Probe,
    canary_check,
    canary_send,
    check_probe,
    last_result,
    probe_visible,
)
from workers.tasks.commit import commit_table
from workers.tasks.write import write_batch

pytestmark = pytest.mark.integration


def take_messages(client: redis.Redis, queue: str = "ingest") -> list[tuple[str, dict[str, Any]]]:
    """Pop every task message of a queue: (task name, kwargs), oldest first."""
    out = []
    while (raw := client.rpop(queue)) is not None:
        message = json.loads(raw)
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], kwargs))
    return out


def canary_count() -> float:
    return samples(process_metrics().render()).get(("icefleet_canary_seconds_count", ()), 0.0)


def test_canary_times_a_probe_until_a_table_scan_shows_it(
    rt: Runtime, redis_client: redis.Redis
) -> None:
    before = canary_count()

    # When beat's canary task runs
    sent = canary_send.apply().get()

    # Then a probe batch for the canary table and its first check wait on the ingest queue
    [(write_name, write), (check_name, check)] = take_messages(redis_client)
    assert (write_name, check_name) == (WRITE_TASK, CHECK_TASK)
    assert write["table"] == CANARY_TABLE and write["batch_id"] == sent["probe_id"]
    assert check == sent

    # ... a check before the probe is written finds nothing, records nothing, checks again later
    assert canary_check.apply(kwargs=check).get() is None
    assert last_result(redis_client) is None
    [(again, again_kwargs)] = take_messages(redis_client)
    assert (again, again_kwargs) == (CHECK_TASK, check)

    # When a writer and the committer do their part (in this process)
    assert write_batch.apply(kwargs=write).get()["records"] == 1
    assert commit_table.apply(args=[CANARY_TABLE]).get()[0]["records"] == 1

    # Then the next check sees the probe and records its end-to-end time, in Redis and a metric
    result = canary_check.apply(kwargs=check).get()
    assert result is not None and result["status"] == "ok"
    assert 0 < result["latency_s"] < 60
    assert last_result(redis_client) == result
    assert canary_count() == before + 1
    assert take_messages(redis_client) == []  # no further check

    # ... and the fleet-wide metrics (the gateway's) report it
    got = samples(create_metrics(redis_client).render())
    assert got[("icefleet_canary_ok", ())] == 1
    assert got[("icefleet_canary_last_seconds", ())] == pytest.approx(result["latency_s"])
    assert ("icefleet_freshness_lag_seconds", (("table", CANARY_TABLE),)) in got


def test_a_probe_never_seen_times_out(rt: Runtime, redis_client: redis.Redis) -> None:
    probe = Probe("canary-00000000-0000-0000-0000-000000000000", sent_ms=1_000, deadline_ms=61_000)

    # Before its deadline, an unseen probe (the table does not even exist) is checked again
    assert not probe_visible(rt.catalog, probe)
    assert check_probe(redis_client, rt.catalog, probe, now_ms=60_000) is None

    # After it, it is recorded as a timeout without a time
    result = check_probe(redis_client, rt.catalog, probe, now_ms=61_000)
    assert result is not None
    assert (result["status"], result["latency_s"]) == ("timeout", None)
    assert last_result(redis_client) == result
    assert samples(create_metrics(redis_client).render())[("icefleet_canary_ok", ())] == 0


def test_probe_ids_are_checked_before_they_reach_a_filter(rt: Runtime) -> None:
    # Given a canary table with one probe in it
    canary_send.apply().get()
    for name, kwargs in take_messages(rt.client):
        if name == WRITE_TASK:
            write_batch.apply(kwargs=kwargs).get()
    commit_table.apply(args=[CANARY_TABLE]).get()

    # Then an id from a message that is not a probe's never reaches the scan's filter
    with pytest.raises(ValueError, match="not a canary probe id"):
        probe_visible(rt.catalog, Probe("x' OR id != '", 0, 1))


def test_beat_schedules_the_canary_unless_turned_off(tmp_path: Path) -> None:
    on = load_settings({"ICEFLEET_CANARY_INTERVAL_S": "120"}, home=tmp_path)
    off = load_settings({"ICEFLEET_CANARY_INTERVAL_S": "0"}, home=tmp_path)
    assert canary_schedule(on)["canary"]["task"] == CANARY_TASK
    assert canary_schedule(on)["canary"]["schedule"] == 120
    assert canary_schedule(off) == {}
    app = create_app(on)
    try:
        assert {CANARY_TASK, CHECK_TASK} <= set(app.tasks)
        assert app.conf.beat_schedule["canary"]["options"]["queue"] == "ingest"
    finally:
        app.close()
