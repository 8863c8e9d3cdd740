"""HTTP inputs honoured or refused, never altered, over real HTTP (``icefleet serve`` of
tests/integration/test_gateway.py: 64 KiB body limit, a token): one test per rule, each checking
what reached the ingest queue (exactly the event sent, or nothing)."""

from __future__ import annotations

import gzip
import http.client
import json
from urllib.parse import urlsplit

import pytest
import redis

from tests.integration import test_gateway
from tests.integration.test_gateway import (
    AUTH,
    BATCH,
    MAX_BODY_BYTES,
    STRUCTURED,
    Server,
    event,
    post,
    queued_batches,
)

pytestmark = pytest.mark.integration

served = test_gateway.gateway  # that module's server, here as the fixture "served"


def raw_post(base: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """POST with headers sent as given (http.client: no re-encoding, latin-1 on the wire)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", "/events")
        for name, value in {**AUTH, **headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value.encode("latin-1"))
        conn.endheaders(body)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_a_gzip_body_is_decoded_and_lands_as_sent(
    served: Server, redis_client: redis.Redis
) -> None:
    # Given a batch sent gzip-compressed
    events = [event("gz-1"), event("gz-2", data={"é": "ü"})]
    body = gzip.compress(json.dumps(events).encode())

    # When it is posted with Content-Encoding: gzip
    reply = post(served.url, body, BATCH, **{"Content-Encoding": "gzip"})

    # Then the events in the queue are the ones sent
    assert reply.status == 202, reply.text
    assert queued_batches(redis_client)[reply.body["batch_id"]] == events


def test_a_gzip_bomb_is_413_on_its_decoded_size(served: Server, redis_client: redis.Redis) -> None:
    # Given a body far under the limit that decodes far over it
    inner = json.dumps([event(f"b-{n}", data={"pad": "0" * 1_000}) for n in range(500)]).encode()
    body = gzip.compress(inner)
    assert len(body) < MAX_BODY_BYTES < len(inner)

    # When it is posted gzip-encoded, then it is refused as too large and nothing is enqueued
    reply = post(served.url, body, BATCH, **{"Content-Encoding": "gzip"})
    assert reply.status == 413 and "decodes" in reply.body["error"]
    assert queued_batches(redis_client) == {}


@pytest.mark.parametrize("encoding", ["br", "deflate"])
def test_other_content_encodings_are_415(
    served: Server, redis_client: redis.Redis, encoding: str
) -> None:
    reply = post(served.url, event("e-1"), STRUCTURED, **{"Content-Encoding": encoding})
    assert reply.status == 415 and encoding in reply.body["error"]
    assert queued_batches(redis_client) == {}


def test_binary_mode_headers_are_percent_decoded_utf8(
    served: Server, redis_client: redis.Redis
) -> None:
    # Given a binary-mode event whose source and an extension carry percent-encoded UTF-8
    headers = {
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "pct-1",
        "ce-source": "/caf%C3%A9",
        "ce-type": "com.example.http_order",
        "ce-comment": "50%25 %22off%22",
    }

    # When it is posted, then they land decoded, exactly
    status, _, text = raw_post(served.url, b'{"n": 1}', headers)
    assert status == 202, text
    (landed,) = queued_batches(redis_client)[json.loads(text)["batch_id"]]
    assert (landed["source"], landed["comment"]) == ("/café", '50% "off"')


@pytest.mark.parametrize("value", ["/caf\u00e9", "/%FF", "/50%"])
def test_binary_mode_headers_that_are_not_percent_encoded_utf8_are_400(
    served: Server, redis_client: redis.Redis, value: str
) -> None:
    headers = {
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "bad-1",
        "ce-source": value,
        "ce-type": "com.example.http_order",
    }
    status, _, text = raw_post(served.url, b'{"n": 1}', headers)
    assert status == 400 and "ce-source" in json.loads(text)["error"]
    assert queued_batches(redis_client) == {}


def test_oversized_headers_are_431(served: Server, redis_client: redis.Redis) -> None:
    status, _, text = raw_post(
        served.url,
        json.dumps(event("h-1")).encode(),
        {"Content-Type": STRUCTURED, "X-Padding": "p" * 20_000},
    )
    assert status == 431 and "over the limit" in json.loads(text)["error"]
    assert queued_batches(redis_client) == {}


@pytest.mark.parametrize(
    ("body", "content_type", "where"),
    [
        (
            b'{"specversion":"1.0","id":"d-1","source":"/s","type":"t.x","id":"d-2"}',
            STRUCTURED,
            "the event",
        ),
        (
            b'[{"specversion":"1.0","id":"d-3","source":"/s","type":"t.x"},'
            b'{"specversion":"1.0","id":"d-4","source":"/s","type":"t.x","data":{"a":1,"a":2}}]',
            BATCH,
            "element 1",
        ),
    ],
)
def test_a_key_twice_in_one_event_is_400(
    served: Server, redis_client: redis.Redis, body: bytes, content_type: str, where: str
) -> None:
    reply = post(served.url, body, content_type)
    assert reply.status == 400 and reply.body["error"].startswith(where)
    assert "twice" in reply.body["error"]
    assert queued_batches(redis_client) == {}
