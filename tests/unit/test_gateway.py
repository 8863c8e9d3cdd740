"""The gateway's request handling without a server: content modes, binary-mode events, the
producer pool. The HTTP behaviour end to end is in tests/integration/test_gateway.py."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
import redis

from workers.gateway import Outcome, ProducerPool, redis_state
from workers.gateway_modes import (
    BATCH,
    STRUCTURED,
    Rejection,
    RequestError,
    binary_event,
    media_type,
    parse_request,
    request_mode,
)

pytestmark = pytest.mark.unit

CE = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t.x"}
EVENT = b'{"specversion":"1.0","id":"1","source":"/s","type":"t.x"}'


@pytest.mark.parametrize(
    ("content_type", "headers", "mode"),
    [
        (f"{STRUCTURED}; charset=utf-8", {}, "structured"),
        (STRUCTURED.upper(), CE, "structured"),  # the content type wins over ce-* headers
        (BATCH, {}, "batch"),
        ("application/json", CE, "binary"),
        ("text/plain", CE, "binary"),
        (None, {"CE-SpecVersion": "1.0"}, "binary"),
        ("application/json", {}, "json"),
        ("application/x-ndjson", {}, "ndjson"),
    ],
)
def test_request_mode(content_type: str | None, headers: dict[str, str], mode: str) -> None:
    assert request_mode(content_type, headers) == mode


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml"])
def test_other_content_types_without_ce_headers_are_415(content_type: str | None) -> None:
    with pytest.raises(RequestError) as raised:
        request_mode(content_type, {})
    assert raised.value.status == 415


def test_media_type() -> None:
    assert media_type(" Application/JSON ; charset=utf-8") == "application/json"
    assert media_type(None) == ""


def test_binary_event_without_a_body_has_no_data() -> None:
    assert orjson.loads(binary_event(CE, b"  \n", None)) == {
        "specversion": "1.0",
        "id": "1",
        "source": "/s",
        "type": "t.x",
    }


def test_binary_event_keeps_a_json_body_verbatim_and_encodes_others() -> None:
    body = b'{"big": 123456789012345678901234567890, "f": 1.10}'
    raw = binary_event(CE, body, "application/vnd.example+json")
    assert raw.endswith(b',"data":' + body + b"}")
    text = binary_event(CE, "héllo".encode(), "text/plain; charset=utf-8")
    assert base64.b64decode(orjson.loads(text)["data_base64"]) == "héllo".encode()


@pytest.mark.parametrize("header", ["ce-data", "ce-datacontenttype", "ce-data_base64"])
def test_binary_event_refuses_data_in_headers(header: str) -> None:
    with pytest.raises(RequestError, match="not allowed in binary mode"):
        binary_event({**CE, header: "x"}, b"", None)


def test_structured_and_binary_modes_carry_exactly_one_event() -> None:
    with pytest.raises(RequestError, match="exactly one event"):
        parse_request("structured", {}, EVENT + b"\n" + EVENT + b"\n", max_event_bytes=10_000)


def test_events_over_the_event_limit_are_rejected_not_refused() -> None:
    events, rejected = parse_request("batch", {}, b"[" + EVENT + b"]", max_event_bytes=10)
    assert events == []
    assert rejected[0].position == 0 and "over the limit of 10 bytes" in rejected[0].reason


def test_outcome_body() -> None:
    assert Outcome("b", 2).body() == {"batch_id": "b", "accepted": 2}
    assert Outcome(None, 0, [Rejection(0, "id: missing")]).body() == {
        "batch_id": None,
        "accepted": 0,
        "rejected": [{"position": 0, "reason": "id: missing"}],
    }


class FakeProducer:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_producer_pool_reuses_and_closes() -> None:
    made: list[Any] = []

    def factory() -> Any:
        made.append(FakeProducer())
        return made[-1]

    pool = ProducerPool(factory)
    with pool.borrow() as first, pool.borrow() as second:
        assert first is not second  # two threads at once get two producers
    with pool.borrow() as again:
        assert again in (first, second)  # then they are reused
    with pytest.raises(RuntimeError), pool.borrow() as broken:
        raise RuntimeError("connection lost")
    assert broken.closed  # a producer that failed is not lent again
    pool.close()
    assert all(p.closed for p in made)
    with pool.borrow() as late:  # after close, a borrowed one is closed on return
        pass
    assert late.closed


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (redis.BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
        (redis.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "full"),
        (redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Refused."), "unreachable"),
    ],
)
def test_redis_failures_are_told_as_states_never_addresses(error: Exception, state: str) -> None:
    assert redis_state(error) == state
