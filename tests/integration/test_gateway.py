"""HTTP ingest over real HTTP on 127.0.0.1: ``icefleet serve`` as a user runs it, in a process of
its own, on the test Redis.

Each CloudEvents content mode lands its events in the ingest queue as the writers will read them;
bad requests get the status and the reason they deserve (malformed JSON, wrong content type, over
the size limit, a batch with one invalid event whose valid ones are still enqueued); the bearer
token is required. Then, with real Celery workers (the fleet of tests/integration/test_fleet.py),
events posted over HTTP in every mode are read back from the table exactly once, a retried
request with the same ``Idempotency-Key`` included.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from common.ingest.payloads import unpack
from common.ingest.producer import Producer
from common.lake.catalog import open_catalog
from common.settings import load_settings
from tests.support.catalogs import CatalogBackend, sqlite_backend
from tests.support.services import free_port, wait_for_port
from workers.fleet import Fleet

pytestmark = pytest.mark.integration

TOKEN = "gateway-test-token"
MAX_BODY_BYTES = 64 * 1024
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


def event(
    event_id: str, event_type: str = "com.example.http_order", **extra: Any
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/tests/gateway",
        "type": event_type,
        "time": "2024-05-01T12:00:00Z",
        "data": {"n": 1},
        **extra,
    }


# --- HTTP and the queue ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    text: str = ""


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str = "POST"
) -> Reply:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            status, raw, got = answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = {}
    return Reply(status, parsed if isinstance(parsed, dict) else {}, got, text)


def post(base: str, payload: Any, content_type: str, **headers: str) -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(f"{base}/events", body, {"Content-Type": content_type, **AUTH, **headers})


def queued_batches(client: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    """The write tasks waiting in the ingest queue: batch id → its events, as a writer reads them."""
    batches = {}
    for raw in client.lrange("ingest", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] != "icefleet.write_batch":
            continue
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        lines = unpack(kwargs["payload"], kwargs.get("encoding")).splitlines()
        batches[kwargs["batch_id"]] = [json.loads(line) for line in lines]
    return batches


# --- the server -----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    log: Path


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``icefleet serve`` with a token and a 64 KiB body limit, on the session's Redis."""
    home = tmp_path_factory.mktemp("gateway")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    env.update(
        ICEFLEET_REDIS_URL=redis_url,
        ICEFLEET_HOME=str(home),
        ICEFLEET_HTTP_TOKEN=TOKEN,
        ICEFLEET_HTTP_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        ICEFLEET_LOG_FORMAT="json",
    )
    log = home / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli.main", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, timeout_s=30)
        yield Server(f"http://127.0.0.1:{port}", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"--- icefleet serve (exit {proc.returncode}) ---\n{log.read_text()[-3000:]}")
    # a clean shutdown exits 0 (uvicorn re-raises the SIGTERM it caught; `icefleet serve` turns
    # that into exit 0, or `docker stop` would report 143)
    assert proc.returncode == 0
    assert "Application shutdown complete" in log.read_text()


# --- content modes -----------------------------------------------------------------------------------


def test_structured_mode(gateway: Server, redis_client: redis.Redis) -> None:
    # When one event is posted in structured mode
    reply = post(gateway.url, event("s-1"), f"{STRUCTURED}; charset=utf-8")

    # Then it is accepted and enqueued as one batch holding it
    assert reply.status == 202, reply.text
    assert reply.body["accepted"] == 1
    assert queued_batches(redis_client) == {reply.body["batch_id"]: [event("s-1")]}


def test_batched_mode(gateway: Server, redis_client: redis.Redis) -> None:
    events = [event(f"b-{n}") for n in range(3)]
    reply = post(gateway.url, events, BATCH)
    assert reply.status == 202, reply.text
    assert reply.body["accepted"] == 3
    assert queued_batches(redis_client) == {reply.body["batch_id"]: events}


def test_binary_mode_with_a_json_body(gateway: Server, redis_client: redis.Redis) -> None:
    # Given attributes in ce-* headers (an extension percent-encoded) and a JSON body with an
    # integer no float can hold
    body = b'{"order": 12345678901234567890123, "note": "caf\xc3\xa9"}'
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "bin-1",
        "ce-source": "/tests/gateway",
        "ce-type": "com.example.http_order",
        "ce-time": "2024-05-01T12:00:00Z",
        "ce-subject": "orders/1",
        "ce-region": "eu%20west",
    }

    # When it is posted in binary mode
    reply = post(gateway.url, body, "application/json; charset=utf-8", **headers)

    # Then the event has the headers as attributes, the body as data (exact), the content type
    assert reply.status == 202, reply.text
    [[queued]] = queued_batches(redis_client).values()
    assert queued == {
        "specversion": "1.0",
        "id": "bin-1",
        "source": "/tests/gateway",
        "type": "com.example.http_order",
        "time": "2024-05-01T12:00:00Z",
        "subject": "orders/1",
        "region": "eu west",
        "datacontenttype": "application/json; charset=utf-8",
        "data": {"order": 12345678901234567890123, "note": "café"},
    }


def test_binary_mode_with_a_binary_body(gateway: Server, redis_client: redis.Redis) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "bin-2", "ce-source": "/s", "ce-type": "t.x"}
    reply = post(gateway.url, b"\x00\x01binary", "application/octet-stream", **headers)
    assert reply.status == 202, reply.text
    [[queued]] = queued_batches(redis_client).values()
    assert queued["datacontenttype"] == "application/octet-stream"
    assert base64.b64decode(queued["data_base64"]) == b"\x00\x01binary"
    assert "data" not in queued


@pytest.mark.parametrize(
    ("content_type", "encode"),
    [
        ("application/json", lambda events: json.dumps(events).encode()),
        (
            "application/x-ndjson",
            lambda events: "".join(json.dumps(e) + "\n" for e in events).encode(),
        ),
    ],
)
def test_json_and_ndjson_are_accepted_too(
    gateway: Server, redis_client: redis.Redis, content_type: str, encode: Any
) -> None:
    events = [event("j-1"), event("j-2")]
    reply = post(gateway.url, encode(events), content_type)
    assert reply.status == 202, reply.text
    assert list(queued_batches(redis_client).values()) == [events]


def test_idempotency_key_is_the_batch_id(gateway: Server, redis_client: redis.Redis) -> None:
    reply = post(gateway.url, [event("k-1")], BATCH, **{"Idempotency-Key": "order-feed-0042"})
    assert reply.status == 202 and reply.body["batch_id"] == "order-feed-0042"
    assert set(queued_batches(redis_client)) == {"order-feed-0042"}


# --- bad requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["order-feed~12", "x" * 201])
def test_an_idempotency_key_the_producer_refuses_is_400_with_the_reason(
    gateway: Server, redis_client: redis.Redis, key: str
) -> None:
    # Given an Idempotency-Key the producer refuses as a batch id (with a '~', the mark of the
    # ids icefleet derives, or too long)
    # When events are posted with it
    reply = post(gateway.url, [event("k-2")], BATCH, **{"Idempotency-Key": key})

    # Then the answer is 400 naming the reason (not a 500), and nothing is enqueued
    assert reply.status == 400, reply.text
    assert reply.body["error"].startswith("Idempotency-Key: invalid batch id")
    reason = "reserved for the ids icefleet derives" if "~" in key else "1 to 200 characters"
    assert reason in reply.body["error"]
    assert queued_batches(redis_client) == {}
    assert redis_client.zcard("icefleet:outstanding") == 0


def test_a_batch_with_one_invalid_event_enqueues_the_others(
    gateway: Server, redis_client: redis.Redis
) -> None:
    # Given a batch whose second event has no source and fourth a bad time
    events = [event("v-0"), event("v-1"), event("v-2"), event("v-3")]
    del events[1]["source"]
    events[3]["time"] = "yesterday"

    reply = post(gateway.url, events, BATCH)

    # Then 400 lists each invalid event with its position and reason, the valid ones are enqueued
    assert reply.status == 400, reply.text
    assert reply.body["accepted"] == 2
    assert reply.body["rejected"] == [
        {"position": 1, "reason": "source: required attribute is missing"},
        {"position": 3, "reason": "time: not an RFC 3339 timestamp: 'yesterday'"},
    ]
    assert queued_batches(redis_client) == {reply.body["batch_id"]: [events[0], events[2]]}


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b'{"specversion": "1.0", "id": ', STRUCTURED, "not valid JSON"),
        (b'[{"specversion": "1.0"}', BATCH, "not a valid JSON array"),
        (b"[]", BATCH, "no events"),
        (b"[]", STRUCTURED, "carries one event object"),
        (b'{"specversion": "1.0"}', BATCH, "is a JSON array"),
    ],
)
def test_malformed_bodies_are_refused(
    gateway: Server, redis_client: redis.Redis, body: bytes, content_type: str, reason: str
) -> None:
    reply = post(gateway.url, body, content_type)
    assert reply.status == 400, reply.text
    assert reason in json.dumps(reply.body)
    assert queued_batches(redis_client) == {}


def test_binary_mode_refuses_a_body_that_is_not_one_json_value(
    gateway: Server, redis_client: redis.Redis
) -> None:
    # a body that would smuggle an attribute if it were spliced in
    headers = {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "t.x"}
    reply = post(gateway.url, b'1, "id": "other"', "application/json", **headers)
    assert reply.status == 400 and "not one valid JSON value" in reply.body["error"]
    assert queued_batches(redis_client) == {}


def test_unsupported_content_type_is_415(gateway: Server, redis_client: redis.Redis) -> None:
    reply = post(gateway.url, b"id,source\n1,/s\n", "text/csv")
    assert reply.status == 415
    assert "text/csv" in reply.body["error"] and STRUCTURED in reply.body["error"]
    assert queued_batches(redis_client) == {}


def test_bodies_over_the_limit_are_413(gateway: Server, redis_client: redis.Redis) -> None:
    events = [event(f"big-{n}", data={"pad": "x" * 1000}) for n in range(80)]  # ~90 KiB
    body = json.dumps(events).encode()
    assert len(body) > MAX_BODY_BYTES

    # With a Content-Length (refused before reading) ...
    assert post(gateway.url, body, BATCH).status == 413

    # ... and chunked, without one (refused while reading)
    host, port = gateway.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks: Iterable[bytes] = (body[i : i + 8192] for i in range(0, len(body), 8192))
    conn.request(
        "POST", "/events", body=chunks, headers={"Content-Type": BATCH, **AUTH}, encode_chunked=True
    )
    answer = conn.getresponse()
    assert answer.status == 413 and b"over the limit" in answer.read()
    conn.close()
    assert queued_batches(redis_client) == {}


# --- auth, health, metrics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
def test_token_is_required(
    gateway: Server, redis_client: redis.Redis, authorization: str | None
) -> None:
    headers = {"Content-Type": STRUCTURED}
    if authorization is not None:
        headers["Authorization"] = authorization
    reply = request(f"{gateway.url}/events", json.dumps(event("a-1")).encode(), headers)
    assert reply.status == 401
    assert reply.headers.get("www-authenticate", "").startswith("Bearer")
    assert queued_batches(redis_client) == {}


def test_health_and_metrics(gateway: Server, redis_client: redis.Redis) -> None:
    # Health needs no token
    health = request(f"{gateway.url}/healthz", method="GET")
    assert (health.status, health.body) == (200, {"status": "ok", "redis": "ok"})

    # Metrics need it, and count what was accepted, per table, plus the backlog from Redis
    assert post(gateway.url, [event("m-1"), event("m-2")], BATCH).status == 202
    assert request(f"{gateway.url}/metrics", method="GET").status == 401
    metrics = request(f"{gateway.url}/metrics", headers=AUTH, method="GET")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    lines = metrics.text.splitlines()
    accepted = [line for line in lines if line.startswith("icefleet_events_accepted_total{")]
    assert any('table="events.http_order"' in line for line in accepted)
    assert "icefleet_outstanding_batches 1.0" in lines
    assert 'icefleet_http_requests_total{route="/metrics",status="401"}' in metrics.text


def test_logs_are_json_with_batch_ids(gateway: Server) -> None:
    reply = post(gateway.url, [event("l-1"), {"id": "broken"}], BATCH)
    assert reply.status == 400
    lines = [
        json.loads(line) for line in gateway.log.read_text().splitlines() if line.startswith("{")
    ]
    assert any(line.get("batch_id") == reply.body["batch_id"] for line in lines)
    assert TOKEN not in gateway.log.read_text()


def test_metrics_on_a_port_of_their_own(redis_url: str, tmp_path: Path) -> None:
    # Given `icefleet serve --metrics-port` (the compose stack's layout: 9100 stays internal)
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    env.update(ICEFLEET_REDIS_URL=redis_url, ICEFLEET_HOME=str(tmp_path), ICEFLEET_HTTP_TOKEN=TOKEN)
    argv = [sys.executable, "-m", "workers.cli.main", "serve", "--port", str(port)]
    same = subprocess.run(
        [*argv, "--metrics-port", str(port)], env=env, capture_output=True, text=True, timeout=60
    )
    assert same.returncode == 2 and "must differ from --port" in same.stderr
    proc = subprocess.Popen(
        [*argv, "--metrics-port", str(metrics_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout_s=30)

        # Then the metrics are there, without the ingest token, and not on the ingest port
        scraped = request(f"http://127.0.0.1:{metrics_port}/metrics", method="GET")
        assert scraped.status == 200 and "icefleet_redis_up 1.0" in scraped.text
        main_port = request(f"http://127.0.0.1:{port}/metrics", headers=AUTH, method="GET")
        assert main_port.status == 404
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# --- a gateway in this process: no token, and Redis down ----------------------------------------------


@contextmanager
def _gateway(redis_url: str, home: Path, **overrides: Any) -> Iterator[str]:
    import uvicorn

    from workers.gateway import create_gateway

    settings = load_settings({}, redis_url=redis_url, home=home, **overrides)
    port = free_port()
    config = uvicorn.Config(
        create_gateway(settings), host="127.0.0.1", port=port, log_config=None, ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_without_a_token_anyone_may_post(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    with _gateway(redis_url, tmp_path) as url:
        reply = request(
            f"{url}/events", json.dumps(event("o-1")).encode(), {"Content-Type": STRUCTURED}
        )
        assert reply.status == 202, reply.text
        assert request(f"{url}/metrics", method="GET").status == 200
    assert list(queued_batches(redis_client).values()) == [[event("o-1")]]


def test_redis_down_is_503_with_retry_after_and_states_not_addresses(tmp_path: Path) -> None:
    # Given a gateway whose Redis (with a password in its URL) is not there
    port = free_port()
    with _gateway(f"redis://:s3cret-pw@127.0.0.1:{port}/0", tmp_path) as url:
        # When a load balancer asks for health and a client posts
        health = request(f"{url}/healthz", method="GET")
        reply = post(url, event("d-1"), STRUCTURED)

        # Then both are 503 with Retry-After, saying the state, never the host, port or password
        assert (health.status, health.body) == (
            503,
            {"status": "unavailable", "redis": "unreachable"},
        )
        assert health.headers["retry-after"] == "5"
        assert reply.status == 503 and "unreachable" in reply.body["error"]
        assert reply.headers["retry-after"] == "5"
        for text in (health.text, reply.text):
            assert str(port) not in text and "s3cret" not in text and "127.0.0.1" not in text
        metrics = request(f"{url}/metrics", method="GET")
        assert "icefleet_redis_up 0.0" in metrics.text


# --- posted over HTTP, read back exactly once -------------------------------------------------------


@pytest.fixture
def backend() -> CatalogBackend:
    """The fleet (tests/integration/conftest.py) on the embedded SQLite catalog only."""
    return sqlite_backend()


def test_events_posted_over_http_land_exactly_once(
    gateway: Server, redis_client: redis.Redis, request: pytest.FixtureRequest
) -> None:
    # Given a running fleet (2 writers and a committer) and the gateway on the same Redis
    workers: Fleet = request.getfixturevalue("fleet")
    posted: list[str] = []

    def ids(prefix: str, count: int) -> list[dict[str, Any]]:
        events = [event(f"{prefix}-{n}") for n in range(count)]
        posted.extend(e["id"] for e in events)
        return events

    # When events are posted in every mode, one batch twice with the same Idempotency-Key
    retried = ids("retried", 50)
    for _ in range(2):
        reply = post(gateway.url, retried, BATCH, **{"Idempotency-Key": "http-retry-1"})
        assert reply.status == 202 and reply.body["batch_id"] == "http-retry-1"
    assert post(gateway.url, ids("batch", 200), BATCH).status == 202
    for single in ids("structured", 5):
        assert post(gateway.url, single, STRUCTURED).status == 202
    ndjson = "".join(json.dumps(e) + "\n" for e in ids("ndjson", 100)).encode()
    assert post(gateway.url, ndjson, "application/x-ndjson").status == 202
    binary = ids("binary", 1)[0]
    headers = {f"ce-{k}": v for k, v in binary.items() if k != "data"}
    assert (
        post(gateway.url, json.dumps(binary["data"]).encode(), "application/json", **headers).status
        == 202
    )
    mixed = [*ids("mixed", 10), {"id": "no-such-event"}]
    assert post(gateway.url, mixed, BATCH).status == 400  # the 10 valid ones still land

    with Producer(workers.settings) as producer:
        result = producer.wait(timeout_s=90)
        assert result.done, result.describe()

        # ... and the retried request once more after its batch was committed
        reply = post(gateway.url, retried, BATCH, **{"Idempotency-Key": "http-retry-1"})
        assert reply.status == 202
        result = producer.wait(timeout_s=60)
        assert result.done, result.describe()

    # Then the table holds every posted id exactly once
    table = open_catalog(workers.settings).load_table(("events", "http_order"))
    landed = table.scan(selected_fields=("id",)).to_arrow().column("id").to_pylist()
    assert len(landed) == len(posted) == 366
    assert sorted(landed) == sorted(posted)
