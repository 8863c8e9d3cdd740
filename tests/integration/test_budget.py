"""The budget of work not yet written (common/coord/budget.py): admission, refunds, reconciling,
the producer's typed error and bounded wait, and the cost per batch in Redis commands.

Against the session's real redis-server (the bookkeeping is Lua); messages go to a recorder.
"""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
import pytest
import redis

from common.coord import keys
from common.coord.backlog import Outstanding
from common.coord.budget import (
    MIN_AUTO_BATCHES,
    MIN_AUTO_BYTES,
    Budget,
    admit,
    read_use,
    reconcile,
    retry_after_s,
)
from common.errors import OverloadedError, RetryableError
from common.ingest.producer import Producer, enqueue_write_task
from common.settings import load_settings
from common.wire import WriteTask, part_ids

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def __call__(self, task: str, kwargs: dict[str, Any], queue: str) -> str:
        self.sent.append(kwargs)
        return f"task-{len(self.sent)}"


def event(n: int, pad: int = 0) -> dict[str, Any]:
    """An event with ``pad`` random hex characters: they compress to about half, not to nothing."""
    return {
        "specversion": "1.0",
        "id": f"e{n}",
        "source": "/t",
        "type": "com.example.t",
        "data": {"n": n, "pad": random.Random(n).randbytes(pad // 2).hex()},
    }


def producer(client: redis.Redis, recorder: Recorder, now_s: float = 1000.0, **kw: Any) -> Producer:
    wait = kw.pop("overload_wait_s", 0.0)
    on_overload = kw.pop("on_overload", None)
    settings = load_settings({}, redis_url="redis://127.0.0.1:1/0", **kw)
    return Producer(
        settings,
        client=client,
        publish=recorder,
        clock=lambda: now_s,
        overload_wait_s=wait,
        on_overload=on_overload,
    )


def test_past_the_batch_budget_a_request_is_refused_whole_with_a_delay(
    redis_client: redis.Redis,
) -> None:
    # Given a fleet whose budget is two batches, both used by batches enqueued 20 s ago
    recorder = Recorder()
    early = producer(redis_client, recorder, now_s=1000.0, budget_max_batches=2)
    early.enqueue([event(1)], batch_id="a")
    early.enqueue([event(2)], batch_id="b")

    # When a third request comes at t=1020s
    late = producer(redis_client, recorder, now_s=1020.0, budget_max_batches=2)
    with pytest.raises(OverloadedError) as refused:
        late.enqueue([event(3)], batch_id="c")

    # Then it is refused with a typed, retryable error carrying the delay (20 s / 4) and figures
    assert isinstance(refused.value, RetryableError)
    assert refused.value.retry_after_s == 5
    assert (refused.value.in_use_batches, refused.value.max_batches) == (2, 2)
    assert "try again in 5s" in str(refused.value)
    # and nothing of it reached Redis or the queue
    assert [m.decode() for m in redis_client.zrange(keys.outstanding(), 0, -1)] == ["a", "b"]
    assert redis_client.exists(keys.payload("c")) == 0
    assert [k["batch_id"] for k in recorder.sent] == ["a", "b"]


def test_past_the_byte_budget_a_request_is_refused_and_a_written_batch_frees_its_share(
    redis_client: redis.Redis,
) -> None:
    # Given a byte budget of 300 bytes of packed payload
    recorder = Recorder()
    small = producer(redis_client, recorder, budget_max_bytes=300)
    small.enqueue([event(n, pad=0) for n in range(3)], batch_id="first")
    charged = read_use(redis_client).bytes
    assert charged == len(recorder.sent[0]["payload"]) > 0

    # When a second batch would pass 300 bytes
    with pytest.raises(OverloadedError):
        small.enqueue([event(n, pad=400) for n in range(3)], batch_id="second")

    # Then, once the first is written (the writer's done), the budget is free again
    Outstanding(redis_client).done("first")
    assert read_use(redis_client).bytes == 0
    assert redis_client.hlen(keys.budget_sizes()) == 0
    small.enqueue([event(n, pad=400) for n in range(3)], batch_id="second")
    assert read_use(redis_client).batches == 1


def test_an_idle_fleet_admits_a_request_larger_than_the_budget_whole(
    redis_client: redis.Redis,
) -> None:
    # Given a budget of one batch and a request cut into three parts
    recorder = Recorder()
    big = producer(redis_client, recorder, budget_max_batches=1, batch_max_events=2)

    # When nothing is outstanding, it goes whole (it could never pass otherwise)
    big.enqueue([event(n) for n in range(6)], batch_id="big")
    assert [k["batch_id"] for k in recorder.sent] == part_ids("big", 3)

    # and the next request is refused whole: none of its parts is sent
    with pytest.raises(OverloadedError):
        big.enqueue([event(n) for n in range(6)], batch_id="next")
    assert len(recorder.sent) == 3
    assert read_use(redis_client).batches == 3


def test_a_retried_request_already_outstanding_is_not_refused_nor_charged_twice(
    redis_client: redis.Redis,
) -> None:
    # Given a full budget made of batch "a"
    recorder = Recorder()
    p = producer(redis_client, recorder, budget_max_batches=1)
    p.enqueue([event(1)], batch_id="a")
    used = read_use(redis_client)

    # When "a" is sent again (a client retrying the same Idempotency-Key)
    p.enqueue([event(1)], batch_id="a")

    # Then it goes (its work is counted already) and nothing is charged again
    assert read_use(redis_client) == used
    assert len(recorder.sent) == 2


def test_a_hand_back_is_never_refused(redis_client: redis.Redis) -> None:
    # Given a budget used up
    budget = Budget(max_bytes=10, max_batches=1)
    admit(redis_client, "parent", enqueued_ms=1, size=100, budget=budget)
    sent: list[dict[str, Any]] = []

    # When a writer hands back the rest of a batch (no budget: it replaces counted work)
    enqueue_write_task(redis_client, sent.append, WriteTask("parent~5", "p" * 50), ttl_s=60)

    # Then it is enqueued and charged
    assert [k["batch_id"] for k in sent] == ["parent~5"]
    assert read_use(redis_client) == read_use(redis_client).__class__(150, 2, 1)


def test_the_producer_waits_bounded_when_asked_and_tells_each_wait(
    redis_client: redis.Redis,
) -> None:
    # Given a full budget, and a producer allowed to wait whose callback sees a writer finish
    recorder = Recorder()
    producer(redis_client, recorder, budget_max_batches=1).enqueue([event(1)], batch_id="a")
    told: list[OverloadedError] = []

    def on_overload(exc: OverloadedError) -> None:
        told.append(exc)
        Outstanding(redis_client).done("a")  # the writer catches up meanwhile

    waiting = producer(
        redis_client,
        recorder,
        now_s=1000.0,
        budget_max_batches=1,
        overload_wait_s=30.0,
        on_overload=on_overload,
    )

    # When it enqueues: refused once, told, waits the suggested second, then admitted
    waiting.enqueue([event(2)], batch_id="b")
    assert len(told) == 1 and told[0].retry_after_s == 1
    assert [k["batch_id"] for k in recorder.sent] == ["a", "b"]

    # And with nothing freed it gives up once its bound has passed, with the error
    bounded = producer(redis_client, recorder, budget_max_batches=1, overload_wait_s=0.05)
    with pytest.raises(OverloadedError):
        bounded.enqueue([event(3)], batch_id="c")


def test_reconcile_frees_what_left_outstanding_another_way(redis_client: redis.Redis) -> None:
    # Given two charged batches, one removed from outstanding behind the budget's back
    admit(redis_client, "kept", enqueued_ms=1, size=70, budget=None)
    admit(redis_client, "gone", enqueued_ms=1, size=30, budget=None)
    redis_client.zrem(keys.outstanding(), "gone")
    assert read_use(redis_client).bytes == 100

    # When the sweep reconciles
    freed = reconcile(redis_client)

    # Then the orphaned share is freed and the counter is the sum of what is outstanding
    assert freed == 1
    assert read_use(redis_client).bytes == 70
    assert redis_client.hkeys(keys.budget_sizes()) == [b"kept"]


def test_accounting_costs_the_same_redis_commands_per_batch_whatever_the_backlog(
    redis_client: redis.Redis,
) -> None:
    # Given a producer, and a way to count the commands Redis ran (INFO commandstats)
    p = producer(redis_client, Recorder(), budget_max_batches=1_000_000)

    def commands_for_one_batch() -> dict[str, int]:
        redis_client.config_resetstat()
        p.enqueue([event(1)])  # no key: nothing but the budget's bookkeeping and the message
        Outstanding(redis_client).done(p.last_batch_ids[0])
        stats = redis_client.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(v["calls"])
            for name, v in stats.items()
            if name not in ("cmdstat_info", "cmdstat_config|resetstat")
        }

    # When one batch goes through with 10 batches outstanding, then with 2,000
    for n in range(10):
        admit(redis_client, f"bg{n}", enqueued_ms=1, size=10, budget=None)
    few = commands_for_one_batch()
    for n in range(10, 2_000):
        admit(redis_client, f"bg{n}", enqueued_ms=1, size=10, budget=None)
    many = commands_for_one_batch()

    # Then the same commands run, none of them a scan: two round trips for the bookkeeping (a
    # script to admit and keep the copy, one to release; the commands they run count too)
    assert few == many
    assert few["evalsha"] == 2 and few["set"] == 1, few
    assert not {"zrange", "hgetall", "hvals", "zrangebyscore", "scan", "keys"} & set(few), few


def test_retry_after_grows_with_the_age_of_the_oldest_batch_within_bounds() -> None:
    assert retry_after_s(None, 1_000) == 1
    assert retry_after_s(1_000, 1_500) == 1
    assert retry_after_s(0, 20_000) == 5
    assert retry_after_s(0, 3_600_000) == 30


def test_the_automatic_budget_follows_the_machine_memory() -> None:
    assert Budget.sized(memory_bytes=16 * 2**30) == Budget(2**30, 2**30 // (64 * 1024))
    assert Budget.sized(memory_bytes=0) == Budget(MIN_AUTO_BYTES, 1024)
    assert Budget.sized(max_bytes=1_000).max_batches == MIN_AUTO_BATCHES
    assert Budget.sized(5_000, 7) == Budget(5_000, 7)
    assert load_settings({"ICEFLEET_BUDGET_MAX_BYTES": "5000"}).budget.max_bytes == 5_000


def test_icefleet_send_waits_saying_why_then_fails_having_sent_nothing(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from click.testing import CliRunner

    from workers.cli.main import main

    # Given a fleet whose budget of one batch is used
    monkeypatch.setenv("ICEFLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("ICEFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("ICEFLEET_BUDGET_MAX_BATCHES", "1")
    admit(redis_client, "held", enqueued_ms=int(time.time() * 1000), size=10, budget=None)

    # When `icefleet send` is given a short wait
    line = orjson.dumps(event(1)).decode()
    result = CliRunner().invoke(main, ["send", "--max-wait", "0.2", "-"], input=line)

    # Then it said it waited and why, failed in one line, and enqueued nothing
    assert result.exit_code == 1
    assert "over its budget (1/1 batches" in result.output
    assert "waiting 1s" in result.output
    assert "error: the fleet is over its budget" in result.output
    assert redis_client.zcard(keys.outstanding()) == 1
    assert redis_client.llen("ingest") == 0

    # And once the batch is written, the same command goes through and prints the batch id
    Outstanding(redis_client).done("held")
    sent = CliRunner().invoke(main, ["send", "--batch-id", "k1", "-"], input=line)
    assert sent.exit_code == 0, sent.output
    assert sent.output.splitlines()[0] == "k1"
