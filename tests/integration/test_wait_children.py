"""``icefleet wait`` (``Producer.wait``, ``common.coord.backlog.Waiter``) follows the split children of
the batches it waits for: a batch a writer splits is done only when its ``<id>~<offset>``
descendants are committed or dead-lettered.

First the writer's steps one by one on the real Redis (common/write/partial.py: split record, the
parent's part pending, the child outstanding, the parent out of outstanding), polling between
each; then a real fleet whose writers follow split records (a batch split, its child split again).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from common.coord import keys
from common.coord.backlog import Outstanding, Waiter
from common.ingest.producer import Producer
from common.lake.catalog import open_catalog
from common.settings import load_settings
from common.wire import split_child_id
from common.write.partial import SplitRecords
from tests.support.events import ids_of, make_events
from tests.support.fleet import environment, fleet_config, running_fleet
from tests.support.readback import assert_exactly_once, read_ids

pytestmark = pytest.mark.integration

TABLE = "events.a"


# --- the writer's steps, by hand ----------------------------------------------------------------


def enqueue(client: redis.Redis, batch_id: str) -> None:
    """What the producer (or a writer handing back a child) does first: outstanding."""
    client.zadd(keys.outstanding(), {batch_id: int(time.time() * 1000)}, nx=True)


def register(client: redis.Redis, batch_id: str, table: str = TABLE) -> None:
    """What a writer does when a batch (or its part before the split) is written."""
    client.hset(keys.pending(table), batch_id, "{}")
    client.sadd(keys.pending_tables(), table)


def commit(client: redis.Redis, batch_id: str, table: str = TABLE) -> None:
    client.hdel(keys.pending(table), batch_id)
    if not client.hlen(keys.pending(table)):
        client.srem(keys.pending_tables(), table)


def split(client: redis.Redis, batch_id: str, offset: int) -> str:
    """A writer's split, steps 1 to 4: record, register the part written, child, parent done."""
    SplitRecords(client, 3600).record(batch_id, offset)
    register(client, batch_id)
    child = split_child_id(batch_id, offset)
    enqueue(client, child)
    Outstanding(client).done(batch_id)
    return child


def test_a_batch_split_after_the_wait_began_is_done_only_with_its_child(
    redis_client: redis.Redis,
) -> None:
    # Given a wait that began while batch b was outstanding
    enqueue(redis_client, "b")
    waiter = Waiter(redis_client)
    assert waiter.waited_for == 1

    # When a writer splits b at 40: its first 40 events pending, the rest outstanding as b~40
    child = split(redis_client, "b", 40)
    assert child == "b~40"

    # Then the wait is not done while the child is outstanding, even once b is committed
    result = waiter.poll()
    assert not result.done and result.not_written == ("b~40",)
    assert result.not_committed == {TABLE: ("b",)}
    commit(redis_client, "b")
    result = waiter.poll()
    assert not result.done and result.not_written == ("b~40",) and result.children == 1
    assert "1 of 2 batch(es) not committed" in result.describe()

    # ... nor while the child is written but not committed
    register(redis_client, child)
    Outstanding(redis_client).done(child)
    assert waiter.poll().not_committed == {TABLE: ("b~40",)}

    # ... and done once the child is committed
    commit(redis_client, child)
    result = waiter.poll()
    assert result.done
    assert "all 1 batch(es) enqueued before the wait (and 1 split child batch(es))" in (
        result.describe()
    )


def test_the_child_of_a_batch_still_outstanding_is_waited_for_before_it_is_enqueued(
    redis_client: redis.Redis,
) -> None:
    # Given a wait on batch b, which a writer has split (step 1) but not finished splitting
    enqueue(redis_client, "b")
    waiter = Waiter(redis_client)
    SplitRecords(redis_client, 3600).record("b", 5)

    # When the wait polls before the child is enqueued, Then the child counts as not written
    assert waiter.poll().not_written == ("b", "b~5")

    # ... and if the writer's parent part is then committed before the wait polls again, the
    # child (enqueued before b left outstanding) is still followed
    register(redis_client, "b")
    enqueue(redis_client, "b~5")
    Outstanding(redis_client).done("b")
    commit(redis_client, "b")
    assert waiter.poll().not_written == ("b~5",)
    Outstanding(redis_client).done("b~5")  # dead-lettered: out of outstanding, never pending
    assert waiter.poll().done


def test_grandchildren_split_between_two_polls_are_followed(redis_client: redis.Redis) -> None:
    # Given a wait on b, and between two of its polls b split, its child split again, and the
    # parts of b and b~10 written and committed
    enqueue(redis_client, "b")
    waiter = Waiter(redis_client)
    child = split(redis_client, "b", 10)
    grandchild = split(redis_client, child, 20)
    commit(redis_client, "b")
    commit(redis_client, child)

    # When the wait polls, Then it follows the chain down to b~10~20, in one reading
    result = waiter.poll()
    assert grandchild == "b~10~20"
    assert result.not_written == ("b~10~20",) and result.children == 2
    Outstanding(redis_client).done(grandchild)
    assert waiter.poll().done


def test_waiting_for_given_batch_ids_follows_their_children(redis_client: redis.Redis) -> None:
    # Given batch x, already split and its own part committed, and an unrelated batch y
    enqueue(redis_client, "x")
    child = split(redis_client, "x", 3)
    commit(redis_client, "x")
    enqueue(redis_client, "y")

    # When a wait is for x only, Then it waits for x's child and not for y
    with Producer(load_settings({}, redis_url=_url(redis_client)), client=redis_client) as p:
        result = p.wait(timeout_s=0.05, poll_s=0.01, batch_ids=["x"])
        assert not result.done and result.not_written == (child,)
        Outstanding(redis_client).done(child)
        assert p.wait(timeout_s=1, batch_ids=["x"]).done


def test_the_cli_waits_for_the_given_batch_ids_and_names_what_is_missing(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given batch x split with its child not written yet, and an unrelated batch y
    from click.testing import CliRunner

    from workers.cli.main import main

    enqueue(redis_client, "x")
    child = split(redis_client, "x", 3)
    commit(redis_client, "x")
    enqueue(redis_client, "y")
    monkeypatch.setenv("ICEFLEET_REDIS_URL", _url(redis_client))
    runner = CliRunner()

    # When `icefleet wait --batch-id x` times out, Then it exits 1 naming x's child
    waited = runner.invoke(main, ["wait", "--batch-id", "x", "--timeout", "0.3"])
    assert waited.exit_code == 1
    assert child in waited.output

    # When the child is done, Then waiting for x succeeds although y is still outstanding
    Outstanding(redis_client).done(child)
    assert runner.invoke(main, ["wait", "--batch-id", "x", "--timeout", "5"]).exit_code == 0
    assert runner.invoke(main, ["wait", "--timeout", "0.3"]).exit_code == 1  # y


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


# --- a real fleet ------------------------------------------------------------------------------------


def test_wait_returns_only_when_the_split_children_are_committed(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch of 3,000 events that an earlier attempt split after 1,000 events, and whose
    # child was split in turn after 800: the split records a writer leaves, which the writers
    # follow on the next delivery whatever the machine's speed (a time limit would race for it)
    env, settings = fleet_config(monkeypatch, redis_url, tmp_path / "home")
    splits = SplitRecords(redis_client, 3600)
    splits.record("big", 1_000)
    splits.record(split_child_id("big", 1_000), 800)
    sent = make_events("big", 3_000, types=("com.example.wait_probe",))
    with environment(env), running_fleet(settings, writers=1, log_lines=30):
        producer_settings = load_settings(batch_max_events=20_000)
        with Producer(producer_settings) as producer:
            # When the batch is enqueued and the wait begins at once
            producer.enqueue(sent, batch_id="big")
            result = producer.wait(timeout_s=240)

            # Then the wait returned once the batch, its child and its grandchild were committed
            assert result.done, result.describe()
            assert result.children == 2, result.describe()
            assert redis_client.zcard(keys.outstanding()) == 0
            assert redis_client.scard(keys.pending_tables()) == 0

    # ... and each event landed once, in three parts
    table = open_catalog(settings).load_table("events.wait_probe")
    assert_exactly_once(table, ids_of(sent))
    assert sorted(set(read_ids(table, "_batch_id"))) == ["big", "big~1000", "big~1000~800"]
