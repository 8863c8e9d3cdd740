"""Redis never the thing that dies: the embedded Redis is bounded and never evicts, an external
one that could is warned about at start, a full Redis refuses writes (the producer's error, the
gateway's 503) rather than drop keys, and durable acknowledgements need a Redis that fsyncs.

Each test has a redis-server of its own (``redis_process``): they change its configuration."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis

from common.coord.budget import Budget
from common.coord.redis_memory import eviction_warnings, require_fsync, required_maxmemory
from common.errors import ConfigError
from common.ingest.producer import Producer
from common.settings import load_settings
from tests.support.services import RedisProcess, free_port
from workers.fleet import check_external_redis, redis_process, wait_for_redis

pytestmark = pytest.mark.integration

BUDGET = Budget(max_bytes=64 * 1024 * 1024, max_batches=1_000)


def test_the_embedded_redis_is_bounded_above_the_budget_and_never_evicts(tmp_path: Path) -> None:
    # Given the Redis `icefleet up` and `demo` start, sized for a budget
    port = free_port()
    proc = redis_process(tmp_path, port, maxmemory=required_maxmemory(BUDGET))
    proc.start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(url, proc)
        client = redis.Redis.from_url(url, decode_responses=True)

        # Then its memory is bounded above what the budget can make it hold, without eviction
        config = client.config_get("maxmemory*")
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["maxmemory"]) == required_maxmemory(BUDGET)
        assert required_maxmemory(BUDGET) > 2 * BUDGET.max_bytes
        assert eviction_warnings(client, BUDGET) == []
        client.close()
    finally:
        proc.stop()


def test_an_external_redis_that_could_evict_or_grow_is_warned_about(
    redis_process: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an external Redis with an LRU policy and no limit (Redis' defaults are no limit)
    client = redis.Redis.from_url(redis_process.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory", 0)
    settings = load_settings(
        {}, redis_url=redis_process.url, budget_max_bytes=BUDGET.max_bytes, budget_max_batches=1_000
    )

    # When icefleet starts against it
    with caplog.at_level(logging.WARNING, logger="common.coord.redis_memory"):
        check_external_redis(settings)

    # Then it warns of both dangers with the fix, naming no address
    text = caplog.text
    assert "maxmemory-policy is allkeys-lru" in text and "noeviction" in text
    assert f"at least {required_maxmemory(BUDGET) // 2**20}mb" in text
    assert str(redis_process.port) not in text

    # And a limit below what the budget needs is a warning of its own
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 10 * 1024 * 1024)
    (warning,) = eviction_warnings(client, BUDGET)
    assert "below the" in warning and "ICEFLEET_BUDGET_MAX_BYTES" in warning
    client.close()


def test_a_full_redis_refuses_the_producer_and_keeps_every_key(
    redis_process: RedisProcess,
) -> None:
    # Given a Redis at its maxmemory under noeviction, with icefleet's keys in it
    client = redis.Redis.from_url(redis_process.url)
    producer = Producer(load_settings({}, redis_url=redis_process.url))
    producer.enqueue([_event(0)], batch_id="kept")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # any byte more is over

    # When a producer enqueues more
    with pytest.raises(redis.OutOfMemoryError):
        producer.enqueue([_event(1)], batch_id="refused")

    # Then it is refused, and nothing icefleet had was dropped to make room
    assert client.zrange("icefleet:outstanding", 0, -1) == [b"kept"]
    assert client.llen("ingest") == 1
    producer.close()
    client.close()


def test_durable_acknowledgements_need_a_redis_that_fsyncs_every_write(
    redis_process: RedisProcess,
) -> None:
    client = redis.Redis.from_url(redis_process.url)
    settings = load_settings({"ICEFLEET_ACK_DURABILITY": "fsync"}, redis_url=redis_process.url)

    # Given a Redis with the usual appendfsync everysec, a producer asking for fsync is refused
    with pytest.raises(ConfigError, match=r"ICEFLEET_ACK_DURABILITY.*appendfsync always"):
        Producer(settings)

    # When Redis fsyncs every write, it is accepted
    client.config_set("appendfsync", "always")
    require_fsync(client)
    with Producer(settings) as producer:
        assert producer.enqueue([_event(2)], batch_id="durable") == "durable"
    client.close()


def _event(n: int) -> dict[str, object]:
    return {"specversion": "1.0", "id": f"m{n}", "source": "/m", "type": "com.example.m"}


def test_the_gateway_answers_503_with_retry_after_while_redis_is_full(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    from tests.integration.test_gateway import STRUCTURED, _gateway, post

    # Given a gateway whose Redis is at its maxmemory under noeviction
    client = redis.Redis.from_url(redis_process.url)
    with _gateway(redis_process.url, tmp_path) as url:
        client.config_set("maxmemory", 1)

        # When a client posts an event
        reply = post(url, _event(3), STRUCTURED)

    # Then it is told to come back later, and why, and nothing was enqueued
    assert reply.status == 503, reply.text
    assert reply.headers["retry-after"] == "5"
    assert "the queue is full" in reply.body["error"]
    assert client.llen("ingest") == 0
    client.close()
