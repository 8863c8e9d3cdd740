"""The producer: batch splitting, ids, the outstanding bookkeeping, the message, the backlog.

Redis is the session's real redis-server (the budget's bookkeeping is a Lua script, which
fakeredis runs only with its ``lupa`` extra); messages go to a recording publisher, or through
kombu's in-memory transport to check that a Celery worker would accept them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import redis

import common.coord.backlog
from common.coord import keys
from common.coord.backlog import Backlog, Outstanding, Waiter, read_backlog
from common.errors import (
    BatchConflictError,
    IcefleetError,
    InvalidBatchIdError,
    InvalidEventError,
    InvalidIdentifierError,
)
from common.ingest.payloads import ZSTD, unpack
from common.ingest.producer import KombuPublisher, Producer, split_lines
from common.settings import load_settings
from common.wire import INGEST_QUEUE, WRITE_TASK, check_batch_id, part_ids, task_message

pytestmark = pytest.mark.integration


def event(n: int, size: int = 0) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e{n}",
        "source": "/test",
        "type": "com.example.page_view",
        "data": {"pad": "x" * size},
    }


class Recorder:
    """Records what a producer publishes, with each payload as the writer will read it."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, dict[str, Any], str]] = []
        self.packed: list[str] = []
        self.fail = fail

    def __call__(self, task: str, kwargs: dict[str, Any], queue: str) -> str:
        if self.fail:
            raise ConnectionError("broker down")
        assert kwargs["encoding"] == ZSTD  # the producer always packs (common/ingest/payloads.py)
        self.packed.append(kwargs["payload"])
        text = unpack(kwargs["payload"], kwargs["encoding"])
        assert isinstance(text, bytes)
        readable = {**kwargs, "payload": text.decode("utf-8", "surrogatepass"), "encoding": None}
        self.sent.append((task, readable, queue))
        return f"task-{len(self.sent)}"


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


def make_producer(client: Any, publish: Any, now_s: float = 1000.0, **limits: int) -> Producer:
    settings = load_settings({}, redis_url="redis://127.0.0.1:1/0", **limits)
    return Producer(settings, client=client, publish=publish, clock=lambda: now_s)


# --- splitting -------------------------------------------------------------------------------------


def test_split_lines_caps_events_per_batch_and_keeps_order() -> None:
    lines = [f"line{n}" for n in range(7)]
    assert split_lines(lines, max_events=3, max_bytes=10_000) == [
        ["line0", "line1", "line2"],
        ["line3", "line4", "line5"],
        ["line6"],
    ]


def test_split_lines_caps_bytes_counting_the_newline() -> None:
    lines = ["a" * 9, "b" * 9, "c" * 9]  # 10 bytes each with "\n"
    assert split_lines(lines, max_events=100, max_bytes=20) == [["a" * 9, "b" * 9], ["c" * 9]]
    assert split_lines(lines, max_events=100, max_bytes=19) == [["a" * 9], ["b" * 9], ["c" * 9]]


def test_split_lines_sends_an_oversized_line_alone_instead_of_dropping_it() -> None:
    lines = ["small", "x" * 100, "tail"]
    assert split_lines(lines, max_events=10, max_bytes=20) == [["small"], ["x" * 100], ["tail"]]


def test_split_lines_counts_utf8_bytes_not_characters() -> None:
    lines = ["é" * 5, "é" * 5]  # 10 bytes + newline each
    assert split_lines(lines, max_events=10, max_bytes=21) == [["é" * 5], ["é" * 5]]


def test_child_ids_keep_the_id_when_not_split() -> None:
    assert part_ids("k", 1) == ["k"]
    assert part_ids("k", 3) == ["k~p0", "k~p1", "k~p2"]


# --- enqueue ---------------------------------------------------------------------------------------


def test_enqueue_splits_into_children_with_derived_ids(client: redis.Redis) -> None:
    # Given a producer whose batches hold at most 4 events
    recorder = Recorder()
    producer = make_producer(client, recorder, batch_max_events=4)

    # When 10 events are enqueued under an idempotency key
    batch_id = producer.enqueue([event(n) for n in range(10)], batch_id="order-42")

    # Then the key is returned, three children are sent in order, and no event is lost
    assert batch_id == "order-42"
    assert producer.last_batch_ids == ["order-42~p0", "order-42~p1", "order-42~p2"]
    assert [kwargs["batch_id"] for _, kwargs, _ in recorder.sent] == producer.last_batch_ids
    assert {(task, queue) for task, _, queue in recorder.sent} == {(WRITE_TASK, INGEST_QUEUE)}
    ids = [
        orjson.loads(line)["id"]
        for _, kwargs, _ in recorder.sent
        for line in kwargs["payload"].splitlines()
    ]
    assert ids == [f"e{n}" for n in range(10)]
    assert [len(kwargs["payload"].splitlines()) for _, kwargs, _ in recorder.sent] == [4, 4, 2]


def test_enqueue_splits_by_bytes(client: redis.Redis) -> None:
    recorder = Recorder()
    producer = make_producer(client, recorder, batch_max_bytes=3_000, commit_max_bytes=10**9)
    producer.enqueue_many([event(n, size=1_000) for n in range(5)])
    assert [len(k["payload"].splitlines()) for _, k, _ in recorder.sent] == [2, 2, 1]
    assert all(len(k["payload"].encode()) <= 3_000 for _, k, _ in recorder.sent)


def test_enqueue_without_key_uses_a_fresh_uuid(client: redis.Redis) -> None:
    recorder = Recorder()
    producer = make_producer(client, recorder)
    first = producer.enqueue([event(1)])
    second = producer.enqueue([event(1)])
    assert first != second and len(first) == 36
    assert producer.last_batch_ids == [second]


def test_enqueue_keeps_json_text_verbatim(client: redis.Redis) -> None:
    recorder = Recorder()
    producer = make_producer(client, recorder)
    raw = '{"specversion":"1.0", "id":"x1","source":"/s","type":"t",  "big":123456789012345678901}'
    producer.enqueue([raw, raw.encode()], table="events.raw")
    _, kwargs, _ = recorder.sent[0]
    assert kwargs["payload"] == f"{raw}\n{raw}\n"
    assert kwargs["table"] == "events.raw"


@pytest.mark.parametrize(
    "payload",
    [
        '{"id":"a"}\n{"id":"b"}\n',
        b'[{"id":"a"},{"id":"b"}]',
    ],
)
def test_enqueue_takes_a_whole_payload(client: redis.Redis, payload: str | bytes) -> None:
    recorder = Recorder()
    make_producer(client, recorder).enqueue(payload)
    lines = recorder.sent[0][1]["payload"].splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b"]


def test_enqueue_refuses_a_bad_table_before_sending(client: redis.Redis) -> None:
    recorder = Recorder()
    producer = make_producer(client, recorder)
    with pytest.raises(InvalidIdentifierError, match="Events"):
        producer.enqueue([event(1)], table="Events.page")
    with pytest.raises(InvalidIdentifierError, match=r"namespace\.table"):
        producer.enqueue([event(1)], table="page")
    assert recorder.sent == []
    assert client.zcard(keys.outstanding()) == 0


def test_enqueue_refuses_nothing_and_unencodable_events(client: redis.Redis) -> None:
    producer = make_producer(client, Recorder())
    with pytest.raises(ValueError, match="no events"):
        producer.enqueue([])
    with pytest.raises(InvalidEventError, match="event 1"):
        producer.enqueue([event(0), b"\xff\xfe"])
    with pytest.raises(ValueError, match="batch id"):
        producer.enqueue([event(0)], batch_id="")


@pytest.mark.parametrize("batch_id", ["orders~12", "a~0", "x~1~2", "~7", "orders~p0", "a~b", "~"])
def test_enqueue_refuses_an_id_in_the_derived_namespace(client: redis.Redis, batch_id: str) -> None:
    # Given a batch id holding '~', the mark of the ids icefleet derives (parts, splits, replays)
    recorder = Recorder()
    producer = make_producer(client, recorder)

    # When it is enqueued, Then it is refused with the reason, in icefleet's hierarchy
    with pytest.raises(InvalidBatchIdError, match=r"'~' is reserved for the ids icefleet derives"):
        producer.enqueue([event(1)], batch_id=batch_id)

    # And nothing was sent, bound or recorded as outstanding
    assert recorder.sent == []
    assert client.zcard(keys.outstanding()) == 0
    assert client.exists(keys.content(batch_id)) == 0


@pytest.mark.parametrize("batch_id", ["orders:0", "orders:1", "a-12", "o:12:3", "x" * 200])
def test_ids_shaped_like_the_old_parts_are_a_callers_own(
    client: redis.Redis, batch_id: str
) -> None:
    # Given ids without '~' (':<n>' was the parts' separator before), When enqueued,
    # Then they are accepted: no derived id can have that shape any more
    assert check_batch_id(batch_id) == batch_id
    assert make_producer(client, Recorder()).enqueue([event(1)], batch_id=batch_id) == batch_id


def test_the_same_id_with_other_events_is_refused_before_anything_is_sent(
    client: redis.Redis,
) -> None:
    # Given a batch enqueued under an idempotency key
    recorder = Recorder()
    make_producer(client, recorder).enqueue([event(1), event(2)], batch_id="k")

    # When the key is used again for other events, or the same events for another table
    producer = make_producer(client, recorder)
    with pytest.raises(BatchConflictError, match=r"batch id 'k' is taken: .*other events") as other:
        producer.enqueue([event(1), event(3)], batch_id="k")
    with pytest.raises(BatchConflictError):
        producer.enqueue([event(1), event(2)], table="events.elsewhere", batch_id="k")

    # Then both are refused with a typed error naming the id, and only the first was sent
    assert other.value.batch_id == "k" and isinstance(other.value, IcefleetError)
    assert len(recorder.sent) == 1

    # And the same events again under the key are a no-op resend, as always
    producer.enqueue([event(1), event(2)], batch_id="k")
    assert [kwargs["payload"] for _, kwargs, _ in recorder.sent[1:]] == [
        recorder.sent[0][1]["payload"]
    ]


def test_a_resend_is_cut_into_the_same_parts_whatever_the_limits_are_now(
    client: redis.Redis,
) -> None:
    # Given 10 events enqueued in parts of at most 4 under an id
    first = Recorder()
    make_producer(client, first, batch_max_events=4).enqueue(
        [event(n) for n in range(10)], batch_id="k"
    )

    # When they are sent again by producers with other limits (parts of 3, or no cut at all)
    for limit in (3, 100):
        again = Recorder()
        producer = make_producer(client, again, batch_max_events=limit)
        producer.enqueue([event(n) for n in range(10)], batch_id="k")

        # Then each part id carries exactly the events it carried the first time
        assert producer.last_batch_ids == ["k~p0", "k~p1", "k~p2"]
        assert [k["payload"] for _, k, _ in again.sent] == [k["payload"] for _, k, _ in first.sent]


def test_replays_enqueue_under_derived_ids_only(client: redis.Redis) -> None:
    # Given the replay path of the producer, When it is given a derived id, Then it is sent
    recorder = Recorder()
    producer = make_producer(client, recorder)
    assert producer.enqueue_derived([event(1)], None, "~replay-abc") == ["~replay-abc"]
    # And a caller's id is refused there, as a derived id is refused by enqueue()
    with pytest.raises(InvalidBatchIdError, match="not an id icefleet derives"):
        producer.enqueue_derived([event(1)], None, "orders")
    assert len(recorder.sent) == 1


def test_enqueue_records_outstanding_batches_with_their_first_enqueue_time(
    client: redis.Redis,
) -> None:
    # Given a batch enqueued at t=1000s
    recorder = Recorder()
    make_producer(client, recorder, now_s=1000.0).enqueue([event(1)], batch_id="b")

    # When it is enqueued again at t=1005s while still outstanding
    make_producer(client, recorder, now_s=1005.0).enqueue([event(1)], batch_id="b")

    # Then both messages carry the first enqueue time, so both deliveries write the same bytes
    assert [k["enqueued_at_ms"] for _, k, _ in recorder.sent] == [1_000_000, 1_000_000]
    assert client.zscore(keys.outstanding(), "b") == 1_000_000


def test_a_failed_send_forgets_only_what_it_added(client: redis.Redis) -> None:
    make_producer(client, Recorder()).enqueue([event(1)], batch_id="old")
    failing = make_producer(client, Recorder(fail=True))
    with pytest.raises(ConnectionError):
        failing.enqueue([event(2)], batch_id="new")
    with pytest.raises(ConnectionError):
        failing.enqueue([event(1)], batch_id="old")
    assert [m.decode() for m in client.zrange(keys.outstanding(), 0, -1)] == ["old"]


def test_producer_accepts_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICEFLEET_BATCH_MAX_EVENTS", "7")
    producer = Producer("redis://127.0.0.1:1/0", publish=Recorder())
    assert producer.settings.redis_url == "redis://127.0.0.1:1/0"
    assert producer.settings.batch_max_events == 7
    producer.close()


# --- the message -----------------------------------------------------------------------------------


def test_task_message_has_celery_protocol_2_shape() -> None:
    from celery import Celery

    app = Celery("check", set_as_current=False)
    kwargs = {"batch_id": "b", "payload": "{}\n", "table": None, "enqueued_at_ms": 1}
    reference = app.amqp.as_task_v2("id-1", WRITE_TASK, args=(), kwargs=kwargs)
    body, headers = task_message(WRITE_TASK, "id-1", kwargs)
    assert set(headers) == set(reference.headers)
    assert {k: headers[k] for k in ("task", "id", "root_id", "retries", "eta")} == {
        k: reference.headers[k] for k in ("task", "id", "root_id", "retries", "eta")
    }
    assert body == reference.body
    assert "payload" in headers["kwargsrepr"] and "{}" not in headers["kwargsrepr"]


def test_kombu_publisher_puts_the_message_on_the_queue() -> None:
    from kombu import Connection

    publisher = KombuPublisher("memory://")
    task_id = publisher(WRITE_TASK, {"batch_id": "b", "payload": "x"}, INGEST_QUEUE)
    with Connection("memory://") as conn:
        queue = conn.SimpleQueue(INGEST_QUEUE)
        message = queue.get(timeout=2)
        args, kwargs, embed = message.decode()
        message.ack()
        queue.close()
    publisher.close()
    assert message.headers["task"] == WRITE_TASK
    assert message.headers["id"] == task_id == message.properties["correlation_id"]
    assert message.content_type == "application/json"
    assert (args, kwargs["batch_id"], embed["chain"]) == ([], "b", None)


# --- backlog and the writer's side -----------------------------------------------------------------


def test_backlog_is_idle_only_when_nothing_is_outstanding_pending_or_prepared(
    client: redis.Redis,
) -> None:
    assert read_backlog(client).idle
    client.zadd(keys.outstanding(), {"b1": 5})
    client.sadd(keys.pending_tables(), "events.a")
    client.hset(keys.pending("events.a"), "b0", "{}")
    client.set(keys.prepared("events.c"), "{}")
    client.lpush(INGEST_QUEUE, "m1", "m2")
    client.lpush(INGEST_QUEUE + "\x06\x163", "m3")

    backlog = read_backlog(client)

    assert not backlog.idle
    assert backlog.outstanding == 1 and backlog.oldest_outstanding_ms == 5
    assert backlog.pending == {"events.a": 1}
    assert backlog.prepared == ("events.c",)
    assert backlog.queued == {"ingest": 3, "commit": 0}
    text = backlog.describe(now_ms=2005)
    assert "1 batch(es) not written yet (oldest 2.0s)" in text
    assert "1 batch(es) written, not committed, in events.a" in text
    assert "1 prepared commit(s) not finished" in text
    assert backlog.to_dict()["idle"] is False


def test_backlog_with_only_a_queued_message_is_not_idle() -> None:
    assert not Backlog(queued={INGEST_QUEUE: 1}).idle
    assert Backlog(queued={"commit": 4}).idle


def test_outstanding_counts_deliveries_and_forgets_done_batches(
    client: redis.Redis,
) -> None:
    make_producer(client, Recorder()).enqueue([event(1)], batch_id="b")
    outstanding = Outstanding(client)
    assert [outstanding.started("b"), outstanding.started("b")] == [1, 2]
    outstanding.done("b")
    assert client.zcard(keys.outstanding()) == 0
    assert client.hget(keys.deliveries(), "b") is None
    assert outstanding.started("b") == 1


def register(client: redis.Redis, table: str, batch_id: str) -> None:
    """What a writer does: pending first, then out of outstanding."""
    client.hset(keys.pending(table), batch_id, "{}")
    client.sadd(keys.pending_tables(), table)
    Outstanding(client).done(batch_id)


def commit(client: redis.Redis, table: str, *batch_ids: str) -> None:
    client.hdel(keys.pending(table), *batch_ids)
    if not client.hlen(keys.pending(table)):
        client.srem(keys.pending_tables(), table)


@pytest.mark.parametrize("chunk", [10_000, 2])
def test_waiter_waits_for_what_was_there_when_it_began(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(common.coord.backlog, "_CHUNK", chunk)
    # Given a batch not written yet and two written to events.a but not committed
    producer = make_producer(client, Recorder())
    producer.enqueue([event(1)], batch_id="b1")
    for batch_id in ("b0", "b9"):
        producer.enqueue([event(0)], batch_id=batch_id)
        register(client, "events.a", batch_id)

    # When a wait begins, and then another batch is enqueued
    waiter = Waiter(client)
    producer.enqueue([event(2)], batch_id="later")
    first = waiter.poll()

    # Then it waits for the three batches only, and says where each one is
    assert waiter.waited_for == 3
    assert not first.done
    assert first.not_written == ("b1",)
    assert first.not_committed == {"events.a": ("b0", "b9")}
    assert first.remaining == 3
    assert "3 of 3 batch(es) not committed" in first.describe()

    # ... as b1 is written to a new table and the rest committed, it is done
    register(client, "events.b", "b1")
    assert waiter.poll().not_committed == {"events.a": ("b0", "b9"), "events.b": ("b1",)}
    commit(client, "events.a", "b0", "b9")
    commit(client, "events.b", "b1")
    last = waiter.poll()
    assert last.done and last.remaining == 0
    assert "all 3 batch(es)" in last.describe()
    assert read_backlog(client).outstanding == 1  # "later" was not waited for


def test_wait_returns_when_done_or_timed_out(client: redis.Redis) -> None:
    with make_producer(client, Recorder()) as producer:
        seen: list[Any] = []
        assert producer.wait(timeout_s=1, on_poll=seen.append).done
        producer.enqueue([event(1)], batch_id="b")
        result = producer.wait(timeout_s=0.05, poll_s=0.01, on_poll=seen.append)
    assert not result.done and result.not_written == ("b",)
    assert "not written yet (b)" in result.describe()
    assert len(seen) >= 2
