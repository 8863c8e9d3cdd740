"""A write-task message lost on its way to a writer is sent again (common/coord/resend.py).

kombu's Redis transport can lose a message: a worker killed between its ``BRPOP`` and recording
the message as unacknowledged. The producer keeps a copy of each task until the batch is
written; the committer's sweep sends again what has been outstanding too long while the ingest
queue is empty. First the rules on the real Redis, then a real fleet that lands a batch whose
message was taken off the queue before any writer saw it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from common.coord import keys
from common.coord.backlog import Outstanding
from common.coord.resend import resend_lost
from common.ingest.payloads import unpack
from common.ingest.producer import Producer
from common.settings import load_settings
from common.wire import INGEST_QUEUE
from tests.support.events import make_events
from tests.support.fleet import environment, fleet_config, running_fleet
from tests.support.readback import assert_exactly_once, read_ids
from tests.support.stack import make_stack

pytestmark = pytest.mark.integration


class Published:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def __call__(self, kwargs: dict[str, Any]) -> None:
        self.sent.append(kwargs)


def enqueue(redis_url: str, client: redis.Redis, batch_id: str, count: int = 3) -> list[str]:
    """Enqueue a batch as a producer does; return its event ids."""
    events = make_events(batch_id, count)
    with Producer(load_settings({}, redis_url=redis_url), client=client) as producer:
        producer.enqueue(events, batch_id=batch_id)
    return [e["id"] for e in events]


def test_a_batch_outstanding_too_long_with_nothing_queued_is_sent_again_once(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a batch whose message is gone from the queue (taken by a worker that then died)
    ids = enqueue(redis_url, redis_client, "lost")
    redis_client.delete(INGEST_QUEUE)
    published = Published()
    now_ms = int(redis_client.zscore(keys.outstanding(), "lost") or 0) + 10_000

    # When the sweep looks before the batch is old enough, Then nothing is sent
    assert resend_lost(redis_client, published, older_than_s=30, now_ms=now_ms) == []

    # When it looks later, Then the task is sent again with the producer's own arguments
    assert resend_lost(redis_client, published, older_than_s=5, now_ms=now_ms) == ["lost"]
    [kwargs] = published.sent
    assert kwargs["batch_id"] == "lost"
    payload = unpack(kwargs["payload"], kwargs["encoding"])
    assert isinstance(payload, bytes)
    assert [line for line in payload.decode().splitlines() if line] and all(
        i in payload.decode() for i in ids
    )

    # ... and not again at the next sweep (once per period), however long it stays outstanding
    assert resend_lost(redis_client, published, older_than_s=5, now_ms=now_ms + 1) == []
    assert len(published.sent) == 1


def test_nothing_is_sent_again_while_messages_wait_or_once_the_batch_is_written(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # Given two old batches, one still queued
    enqueue(redis_url, redis_client, "queued")
    published = Published()
    later_ms = int(redis_client.zscore(keys.outstanding(), "queued") or 0) + 60_000

    # When the ingest queue is not empty, Then no batch counts as lost (it may be behind others)
    assert resend_lost(redis_client, published, older_than_s=5, now_ms=later_ms) == []

    # When the batch is written (or dead-lettered), Then its copy goes and it is never sent again
    redis_client.delete(INGEST_QUEUE)
    Outstanding(redis_client).done("queued")
    assert redis_client.get(keys.payload("queued")) is None
    assert resend_lost(redis_client, published, older_than_s=5, now_ms=later_ms) == []

    # ... and a batch of a producer that keeps no copy is left for `icefleet wait` to name
    redis_client.zadd(keys.outstanding(), {"foreign": 1})
    assert resend_lost(redis_client, published, older_than_s=5, now_ms=later_ms) == []
    assert published.sent == []


def test_a_fleet_lands_a_batch_whose_message_was_lost_exactly_once(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch enqueued whose message is taken off the queue before any writer sees it,
    # and one enqueued normally
    home = tmp_path / "home"
    env, settings = fleet_config(monkeypatch, redis_url, home, ICEFLEET_RESEND_AFTER="2")
    lost = make_events("lost", 40)
    kept = make_events("kept", 40)
    with Producer(settings) as producer:
        producer.enqueue(lost, batch_id="lost")
        assert redis_client.delete(INGEST_QUEUE) == 1
        producer.enqueue(kept, batch_id="kept")

        # When a fleet runs (its committer sweeps every few seconds)
        with environment(env), running_fleet(settings, writers=1, log_lines=30):
            result = producer.wait(timeout_s=90)

    # Then both batches are committed, every event exactly once
    assert result.done, result.describe()
    stack = make_stack(redis_url, home)
    try:
        assert_exactly_once(
            read_ids(stack.table("events.order")), [e["id"] for e in lost + kept], "events.order"
        )
    finally:
        stack.close()
    assert redis_client.get(keys.payload("lost")) is None
