"""Partial progress: a batch that cannot be written in time is split, and still lands exactly once.

In this process on the real Redis (the writer's split protocol, step by step, with redeliveries,
an interrupt inside a chunk and two attempts racing), then through real worker processes whose
time limit is too short for the batches they get (their uploads held by a proxy: no race).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from common.coord import keys
from common.ingest.payloads import unpack
from common.ingest.producer import Producer
from common.settings import load_settings
from common.wire import split_child_id
from common.write.partial import SplitConflictError, SplitRecords, chunk_events, split_key
from tests.support.catalogs import s3_backend
from tests.support.events import expected_by_table, make_events, ndjson
from tests.support.faults import SlowDownProxy
from tests.support.fleet import environment, fleet_config, running_fleet, wait_idle
from tests.support.readback import assert_exactly_once, assert_landed_once, read_ids
from tests.support.services import S3Endpoint
from tests.support.stack import Stack, in_process_tasks, make_stack

pytestmark = pytest.mark.integration

TYPES = ("com.example.order", "com.example.refund")  # two tables: events.order, events.refund


@pytest.fixture
def stack(redis_client: redis.Redis, redis_url: str, icefleet_home: Path) -> Iterator[Stack]:
    built = make_stack(redis_url, icefleet_home)
    yield built
    built.close()


def stop_after(calls: int) -> Any:
    """A ``stop`` callable that says stop from its ``calls``-th question on."""
    asked = 0

    def stop() -> bool:
        nonlocal asked
        asked += 1
        return asked >= calls

    return stop


def write_all(stack: Stack, batch_id: str, payload: str, **options: Any) -> list[str]:
    """Write a batch and every child it hands back, as the write task would; return the ids."""
    splits = SplitRecords(stack.client, 3600)
    written = []
    pending: list[tuple[str, str, dict[str, Any]]] = [(batch_id, payload, options)]
    while pending:
        current, text, opts = pending.pop()
        result = stack.writer.write(
            current,
            text,
            enqueued_at_ms=0,
            split_at=splits.get(current),
            on_split=lambda k, b=current: splits.record(b, k),
            **opts,
        )
        written.append(current)
        if result.remainder is not None:
            pending.append((result.remainder.batch_id, result.remainder.payload, {}))
    return written


def commit_and_check(stack: Stack, events: list[dict[str, Any]]) -> None:
    """Commit everything pending; then each of ``events`` is in its table exactly once."""
    stack.commit_all()
    expected = expected_by_table(stack.settings, events)
    for name in ("events.order", "events.refund"):
        assert_exactly_once(read_ids(stack.table(name)), expected[name], name)


def test_a_batch_stopped_between_chunks_is_split_and_lands_exactly_once(stack: Stack) -> None:
    # Given 1,000 events of two types over three days, written in chunks of 100
    events = make_events("b1", 1_000, types=TYPES, days=3)
    splits = SplitRecords(stack.client, 3600)

    # When the writer must stop before its fourth chunk
    result = stack.writer.write(
        "b1",
        ndjson(events),
        enqueued_at_ms=0,
        chunk_events=100,
        stop=stop_after(3),
        on_split=lambda k: splits.record("b1", k),
    )

    # Then 300 events are registered under b1, and the other 700 come back as b1~300
    assert result.records == 300
    assert result.remainder is not None
    assert (result.remainder.batch_id, result.remainder.offset) == ("b1~300", 300)
    assert result.remainder.events == 700 == len(result.remainder.payload.splitlines())
    assert splits.get("b1") == 300
    assert set(stack.registry.pending_tables()) == {"events.order", "events.refund"}

    # ... and once the child is written and everything committed, each event is there once
    child = stack.writer.write(
        "b1~300", result.remainder.payload, enqueued_at_ms=0, chunk_events=100
    )
    assert child.records == 700 and child.remainder is None
    commit_and_check(stack, events)
    batches = read_ids(stack.table("events.order"), "_batch_id")
    assert set(batches) == {"b1", "b1~300"}


def test_a_redelivered_parent_repeats_its_split_and_duplicates_nothing(stack: Stack) -> None:
    # Given a batch whose refunds all come after the split point, split after 200 events
    events = make_events("b2", 200, types=TYPES[:1]) + make_events("b2r", 300, types=TYPES[1:])
    payload = ndjson(events)
    splits = SplitRecords(stack.client, 3600)
    first = stack.writer.write(
        "b2",
        payload,
        enqueued_at_ms=0,
        chunk_events=100,
        stop=stop_after(2),
        on_split=lambda k: splits.record("b2", k),
    )
    assert first.remainder is not None and first.remainder.offset == 200
    assert set(first.files) == {"events.order"}

    # When the parent is delivered again, whole (its worker died before the ack), twice
    again = [
        stack.writer.write(
            "b2",
            payload,
            enqueued_at_ms=0,
            chunk_events=50,
            split_at=splits.get("b2"),
            on_split=lambda k: splits.record("b2", k),
        )
        for _ in range(2)
    ]

    # Then it writes nothing more (its part is registered) and hands back the same remainder
    for result in again:
        assert result.files == {}
        assert result.skipped_tables == ["events.order"]
        assert result.remainder == first.remainder

    # ... and the refunds table, which has nothing before the split, gets each refund once
    write_all(stack, first.remainder.batch_id, first.remainder.payload)
    write_all(stack, first.remainder.batch_id, first.remainder.payload)  # the child twice too
    commit_and_check(stack, events)


def test_a_parent_redelivered_after_a_partial_registration_completes_it(stack: Stack) -> None:
    # Given a split batch whose registration reached only one of its two tables before dying
    events = make_events("b3", 400, types=TYPES, days=2)
    payload = ndjson(events)
    splits = SplitRecords(stack.client, 3600)
    first = stack.writer.write(
        "b3",
        payload,
        enqueued_at_ms=0,
        chunk_events=100,
        stop=stop_after(2),
        on_split=lambda k: splits.record("b3", k),
    )
    assert first.remainder is not None
    assert stack.registry.remove("events.refund", ["b3"]) == 1

    # When it is delivered again
    again = stack.writer.write(
        "b3",
        payload,
        enqueued_at_ms=0,
        chunk_events=100,
        split_at=splits.get("b3"),
        on_split=lambda k: splits.record("b3", k),
    )

    # Then the missing table is written again for the same events, the other is skipped
    assert set(again.files) == {"events.refund"} and again.skipped_tables == ["events.order"]
    assert again.records == sum(f.record_count for f in first.files["events.refund"])
    write_all(stack, first.remainder.batch_id, first.remainder.payload)
    commit_and_check(stack, events)


class FakeSoftTimeLimit(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded, raised in the middle of a chunk."""


def test_an_interrupt_inside_a_chunk_abandons_it_and_splits_before_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.write.batch_writer

    # Given a storage write that is interrupted the fifth time it is called
    real = common.write.batch_writer.write_data_file
    calls = 0

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise FakeSoftTimeLimit("soft time limit")
        return real(*args, **kwargs)

    monkeypatch.setattr(common.write.batch_writer, "write_data_file", interrupted)
    events = make_events("b4", 600, types=TYPES, days=1)  # 2 files per chunk of 100
    splits = SplitRecords(stack.client, 3600)

    # When the batch is written with that interrupt
    result = stack.writer.write(
        "b4",
        ndjson(events),
        enqueued_at_ms=0,
        chunk_events=100,
        interrupt=(FakeSoftTimeLimit,),
        on_split=lambda k: splits.record("b4", k),
    )

    # Then the two whole chunks are registered and the third is handed back with the rest
    assert result.records == 200
    assert result.remainder is not None and result.remainder.offset == 200
    monkeypatch.setattr(common.write.batch_writer, "write_data_file", real)
    write_all(stack, result.remainder.batch_id, result.remainder.payload, chunk_events=100)
    commit_and_check(stack, events)


def test_an_interrupt_in_the_first_chunk_propagates_and_registers_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.write.batch_writer

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise FakeSoftTimeLimit("soft time limit")

    monkeypatch.setattr(common.write.batch_writer, "write_data_file", interrupted)
    splits = SplitRecords(stack.client, 3600)
    with pytest.raises(FakeSoftTimeLimit):
        stack.writer.write(
            "b5",
            ndjson(make_events("b5", 300)),
            enqueued_at_ms=0,
            chunk_events=100,
            interrupt=(FakeSoftTimeLimit,),
            on_split=lambda k: splits.record("b5", k),
        )
    assert splits.get("b5") is None
    assert stack.registry.pending_tables() == set()


def test_two_attempts_splitting_differently_the_second_follows_the_first(stack: Stack) -> None:
    # Given a batch that one attempt split after 100 events
    events = make_events("b6", 500)
    payload = ndjson(events)
    splits = SplitRecords(stack.client, 3600)
    assert splits.record("b6", 100) == 100

    # When a concurrent attempt (it started before the record existed) wants to split at 300
    with pytest.raises(SplitConflictError) as conflict:
        stack.writer.write(
            "b6",
            payload,
            enqueued_at_ms=0,
            chunk_events=100,
            stop=stop_after(3),
            on_split=lambda k: splits.record("b6", k),
        )

    # Then it registers nothing, and its next delivery follows the recorded split
    assert (conflict.value.wanted, conflict.value.recorded) == (300, 100)
    assert stack.registry.pending_tables() == set()
    written = write_all(stack, "b6", payload, chunk_events=100)
    assert written == ["b6", "b6~100"]
    stack.commit_all()
    assert_exactly_once(read_ids(stack.table("events.order")), [e["id"] for e in events])


def test_an_attempt_splitting_after_a_whole_registration_hands_back_no_child(
    stack: Stack,
) -> None:
    # Given a batch that one attempt wrote and registered whole (as a worker does: it may split)
    events = make_events("b9", 300, types=TYPES, days=2)
    payload = ndjson(events)
    splits = SplitRecords(stack.client, 3600)
    whole = stack.writer.write(
        "b9", payload, enqueued_at_ms=0, on_split=lambda k: splits.record("b9", k)
    )
    assert whole.records == 300 and whole.remainder is None
    # ... which recorded its cut: whole, no split
    assert stack.client.get(split_key("b9")) == b"0" and splits.get("b9") is None

    # When a second attempt of it, started before that registration, must stop after one chunk
    with pytest.raises(SplitConflictError) as conflict:
        stack.writer.write(
            "b9",
            payload,
            enqueued_at_ms=0,
            chunk_events=100,
            stop=stop_after(1),
            on_split=lambda k: splits.record("b9", k),
        )

    # Then it may not split: nothing registered, no child; its redelivery follows the record
    assert (conflict.value.wanted, conflict.value.recorded) == (100, 0)
    again = stack.writer.write(
        "b9", payload, enqueued_at_ms=0, split_at=splits.get("b9"), chunk_events=100
    )
    assert again.remainder is None and again.files == {}
    commit_and_check(stack, events)


def test_a_child_may_split_again(stack: Stack) -> None:
    events = make_events("b7", 900)
    splits = SplitRecords(stack.client, 3600)
    first = stack.writer.write(
        "b7",
        ndjson(events),
        enqueued_at_ms=0,
        chunk_events=100,
        stop=stop_after(2),
        on_split=lambda k: splits.record("b7", k),
    )
    assert first.remainder is not None
    second = stack.writer.write(
        first.remainder.batch_id,
        first.remainder.payload,
        enqueued_at_ms=0,
        chunk_events=100,
        stop=stop_after(4),
        on_split=lambda k: splits.record("b7~200", k),
    )
    assert second.remainder is not None
    assert (
        second.remainder.batch_id == split_child_id(split_child_id("b7", 200), 400) == "b7~200~400"
    )
    write_all(stack, second.remainder.batch_id, second.remainder.payload)
    stack.commit_all()
    assert_exactly_once(read_ids(stack.table("events.order")), [e["id"] for e in events])
    assert stack.client.ttl(split_key("b7")) > 0  # kept for the dedup window, then forgotten


def test_chunks_shrink_on_each_redelivery() -> None:
    assert chunk_events(10_000) == 5_000
    assert chunk_events(10_000, attempt=3) == 1_250
    assert chunk_events(10_000, attempt=40) == 10
    assert chunk_events(1) == 10


# --- real workers, a time limit too short for their batches ------------------------------------------


def data_file_upload(method: str, path: str) -> bool:
    """A data file's upload (whole or one part), not the table's metadata."""
    return method == "PUT" and "/data/" in path


def test_real_workers_split_batches_that_exceed_the_time_limit(
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_endpoint: S3Endpoint,
    s3_bucket: str,
) -> None:
    # Given writers with a 15 s time limit (no chunk is started that would end after 12 s) that
    # write chunks of 1,000 events (one file each: one table, one day) to S3 through a proxy
    # holding each data-file upload 6.5 s: a chunk takes at least 6.5 s, so after one chunk the
    # next would end after 13 s and the writer must split, however fast or loaded the machine
    # (the first chunk, which also creates the table, has 8 s to spare)
    delay = SlowDownProxy(
        s3_endpoint.endpoint_url, fault_rate=0.0, delay_s=6.5, delay_when=data_file_upload
    )
    with delay:
        s3 = s3_backend(
            replace(s3_endpoint, endpoint_url=delay.endpoint_url),
            s3_bucket,
            tmp_path / "catalog.db",
        )
        s3.apply(monkeypatch)
        env, settings = fleet_config(
            monkeypatch,
            redis_url,
            tmp_path / "home",
            ICEFLEET_WRITE_TIMEOUT_S="15",
            ICEFLEET_BATCH_MAX_EVENTS="2000",
            **s3.env,
        )
        # ... and a producer that sends a batch of three chunks and one of less than a chunk
        producer_settings = load_settings(
            {}, redis_url=redis_url, home=tmp_path / "home", batch_max_events=20_000
        )
        events = [*make_events("big-a", 3_000), *make_events("big-b", 800)]

        with environment(env), running_fleet(settings, writers=2):
            # When both are enqueued
            with Producer(producer_settings) as producer:
                producer.enqueue(events[:3_000], batch_id="big-a")
                producer.enqueue(events[3_000:], batch_id="big-b")
            wait_idle(redis_client, timeout_s=240)

        # Then the big one was split after each chunk and the small one was not, and every
        # event landed exactly once
        with make_stack(redis_url, tmp_path / "home", catalog=s3.catalog_name) as stack:
            assert_landed_once(stack.catalog, settings, events)
            batch_ids = set(read_ids(stack.table("events.order"), "_batch_id"))
        assert batch_ids == {"big-a", "big-a~1000", "big-a~1000~1000", "big-b"}
        assert redis_client.get(split_key("big-a")) == b"1000"
        # (a batch written whole records that cut, 0: no child can come of it)
        assert redis_client.get(split_key("big-b")) == b"0"
        assert redis_client.zcard(keys.outstanding()) == 0
        assert delay.stats.delayed >= 4


# --- the write task, in this process -------------------------------------------------------------------


@pytest.fixture
def task_runtime(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The write task runs here on the real Redis; messages it sends stay in their queues."""
    with in_process_tasks(redis_client, redis_url, tmp_path / "home", monkeypatch) as rt:
        yield rt


def ingest_messages(client: redis.Redis) -> list[dict[str, Any]]:
    import json

    return [json.loads(raw) for raw in client.lrange("ingest", 0, -1)]


def test_a_split_batch_given_up_dead_letters_only_its_part(
    task_runtime: Any, redis_client: redis.Redis
) -> None:
    import base64
    import json

    from common.coord.deadletters import DeadLetterStore
    from workers.tasks.write import MAX_ATTEMPTS, write_batch

    # Given a batch split after 3 of its 5 events, then delivered too often
    events = make_events("given-up", 5)
    SplitRecords(redis_client, 3600).record("given-up", 3)
    redis_client.hset(keys.deliveries(), "given-up", MAX_ATTEMPTS)
    redis_client.zadd(keys.outstanding(), {"given-up": 1})

    # When its task runs once more
    result = write_batch.apply(
        kwargs={"batch_id": "given-up", "payload": ndjson(events), "enqueued_at_ms": 1}
    ).get()

    # Then only its own three events are dead-lettered; the other two go on as its child
    assert "without finishing" in result["dead_lettered"]
    [letter] = DeadLetterStore(redis_client).list()
    assert letter.raw.decode() == ndjson(events[:3])
    [message] = ingest_messages(redis_client)
    body = json.loads(base64.b64decode(message["body"]))
    kwargs = body[1]
    assert kwargs["batch_id"] == "given-up~3" and kwargs["enqueued_at_ms"] == 1
    assert unpack(kwargs["payload"], kwargs["encoding"]) == ndjson(events[3:]).encode()
    assert redis_client.zrange(keys.outstanding(), 0, -1) == [b"given-up~3"]


def test_the_time_limit_after_the_write_sends_the_batch_again(
    task_runtime: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    import workers.tasks.write
    from workers.tasks.write import write_batch

    # Given a hand-back that the soft time limit interrupts once
    real = workers.tasks.write.hand_back
    calls = 0

    def interrupted(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SoftTimeLimitExceeded()
        real(*args, **kwargs)

    monkeypatch.setattr(workers.tasks.write, "hand_back", interrupted)
    monkeypatch.setattr(
        workers.tasks.write, "deadline_for", lambda timeout_s, started=None: float("-inf")
    )
    monkeypatch.setattr(workers.tasks.write, "chunk_events", lambda max_events, attempt=1: 2)
    redis_client.zadd(keys.outstanding(), {"late": 1})
    events = make_events("late", 6)

    # When the batch is written (it splits at once: the deadline has passed)
    write_batch.apply(kwargs={"batch_id": "late", "payload": ndjson(events)}).get()

    # Then the retry followed the split record, and the child was handed back once it could be
    assert calls == 2
    assert SplitRecords(redis_client, 60).get("late") == 2
    assert [m["headers"]["task"] for m in ingest_messages(redis_client)] == ["icefleet.write_batch"]
    assert redis_client.zrange(keys.outstanding(), 0, -1) == [b"late~2"]


def test_a_batch_given_up_after_a_partial_registration_dead_letters_only_the_rest(
    task_runtime: Any, redis_client: redis.Redis
) -> None:
    from common.coord.deadletters import DeadLetterStore
    from common.coord.pending import PendingRegistry
    from workers.tasks.write import MAX_ATTEMPTS, write_batch

    # Given a batch of orders and refunds whose orders an earlier attempt registered
    events = make_events("half", 4, types=TYPES)
    PendingRegistry(redis_client).register("events.order", "half", "{}")
    redis_client.hset(keys.deliveries(), "half", MAX_ATTEMPTS)
    bad = '{"specversion":"1.0","id":"","source":"/s","type":"t"}'

    # When it is given up
    write_batch.apply(kwargs={"batch_id": "half", "payload": ndjson(events) + bad + "\n"}).get()

    # Then the dead letter keeps the refunds and the invalid line, not the orders (they landed)
    [letter] = DeadLetterStore(redis_client).list()
    kept = letter.raw.decode().splitlines()
    assert kept == [*ndjson(events[1::2]).splitlines(), bad]
