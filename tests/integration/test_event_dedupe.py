"""Exactly once per accepted event, through a real fleet (2 writers, a committer), the real gateway
(``icefleet serve``) and the real CLI (``icefleet send``), on a real redis-server and SQLite catalog.

Issue 13's reproductions: a caller's id shaped like a part of another batch (``orders:0`` beside a
10,001-event ``orders``) no longer takes its place; an id reused for other events is refused where
it enters (producer, gateway 409, CLI exit 1 naming it). And one test per duplicate source: a POST
retried without a key, ``icefleet send`` run twice, the GitHub webhook corpus sent twice under
different batch ids. Tables are read back with pyiceberg and with iceberg-rust; the duplicate
counters of ``icefleet status --json`` and ``/metrics`` equal what was repeated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from common.coord.deadletters import DeadLetterStore
from common.errors import BatchConflictError
from common.ingest.producer import Producer
from common.ingest.routing import Router
from common.lake.catalog import open_catalog
from common.settings import Settings
from tests.integration.test_gateway import AUTH, BATCH, TOKEN, Server, post, request
from tests.support.fleet import environment, fleet_config, running_fleet, wait_idle
from tests.support.readback import rust_ids
from tests.support.services import free_port, wait_for_port
from workers.fleet import Fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
WEBHOOKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "github-webhooks.ndjson"


def event(kind: str, n: int | str, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{kind}-{n}",
        "source": "/tests/dedupe",
        "type": f"com.example.{kind}",
        "time": "2024-05-01T12:00:00Z",
        "data": {"n": str(n), **data},
    }


def ndjson(events: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def cli(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args],
        env={**os.environ, **env},
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def ids_read_back(settings: Settings, table: str) -> list[str]:
    """Every id of the table as pyiceberg reads it, after checking iceberg-rust reads the same."""
    loaded = open_catalog(settings).load_table(tuple(table.split(".")))
    ids = [str(v) for v in loaded.scan(selected_fields=("id",)).to_arrow().column("id").to_pylist()]
    assert sorted(rust_ids(loaded)) == sorted(ids), f"iceberg-rust disagrees on {table}"
    return ids


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[Server]:
    """``icefleet serve`` on the test Redis, taking bodies of up to 8 MiB."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    env.update(
        ICEFLEET_REDIS_URL=redis_url,
        ICEFLEET_HOME=str(tmp_path / "gateway"),
        ICEFLEET_HTTP_TOKEN=TOKEN,
        ICEFLEET_HTTP_MAX_BODY_BYTES=str(8 << 20),
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli.main", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout_s=60)
        yield Server(f"http://127.0.0.1:{port}", log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def fleet(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Fleet, dict[str, str]]]:
    env, settings = fleet_config(
        monkeypatch,
        redis_url,
        tmp_path / "home",
        ICEFLEET_DEDUPE_TABLES="events.reused=off",
    )
    with environment(env), running_fleet(settings, writers=2, log_lines=30) as workers:
        yield workers, env


def test_accepted_events_land_or_are_refused_and_repeats_land_once(
    fleet: tuple[Fleet, dict[str, str]],
    gateway: Server,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    workers, env = fleet
    settings = workers.settings
    sent: dict[str, list[str]] = {}  # table → every id that must land, once

    # Given (issue 13, reproduction 1) one event sent under the caller's id 'orders:0', then
    # 10,001 events under 'orders', which the producer cuts in two parts
    single = tmp_path / "one-event.ndjson"
    single.write_bytes(ndjson([event("repro_cli", "single")]))
    many = tmp_path / "10001-events.ndjson"
    many.write_bytes(ndjson([event("repro_cli", n) for n in range(10_001)]))
    sent["events.repro_cli"] = ["repro_cli-single"] + [f"repro_cli-{n}" for n in range(10_001)]
    # When both are sent with `icefleet send`
    first = cli(env, "send", str(single), "--batch-id", "orders:0")
    second = cli(env, "send", str(many), "--batch-id", "orders")
    # Then both succeed, and the parts of 'orders' are ids no caller can give
    assert first.returncode == 0 and first.stdout.split() == ["orders:0"], first.stderr
    assert second.returncode == 0 and second.stdout.split() == ["orders~p0", "orders~p1"]

    # Given the same through the gateway: 'k:0' first, then 10,001 events under 'k'
    http_one = [event("repro_http", "single")]
    http_many = [event("repro_http", n) for n in range(10_001)]
    sent["events.repro_http"] = [e["id"] for e in http_one + http_many]
    # When posted, Then both are accepted whole
    reply = post(gateway.url, http_one, BATCH, **{"Idempotency-Key": "k:0"})
    assert (reply.status, reply.body.get("accepted")) == (202, 1), reply.text
    reply = post(gateway.url, http_many, BATCH, **{"Idempotency-Key": "k"})
    assert (reply.status, reply.body.get("accepted")) == (202, 10_001), reply.text

    # Given (reproduction 2) a key and an id used again for other events
    reused = [event("reused", n) for n in range(3)]
    sent["events.reused"] = [e["id"] for e in reused]
    assert post(gateway.url, reused, BATCH, **{"Idempotency-Key": "feed-7"}).status == 202
    other = [event("reused", n, note="other content") for n in range(3)]
    # When the gateway gets the key with other events, Then 409 with the reason, nothing sent
    refused = post(gateway.url, other, BATCH, **{"Idempotency-Key": "feed-7"})
    assert refused.status == 409, refused.text
    assert "'feed-7' is taken" in refused.body["error"] and "other events" in refused.body["error"]
    # When `icefleet send` reuses the id for other events, Then exit 1 naming the id
    changed = tmp_path / "changed.ndjson"
    changed.write_bytes(ndjson(other))
    result = cli(env, "send", str(changed), "--batch-id", "feed-7")
    assert result.returncode == 1 and "batch id 'feed-7' is taken" in result.stderr
    # When the producer does, Then a typed error
    with Producer(settings) as producer, pytest.raises(BatchConflictError) as caught:
        producer.enqueue(other, batch_id="feed-7")
    assert caught.value.batch_id == "feed-7"

    # Given (duplicate source 1) a client retrying a POST without an Idempotency-Key
    retried = [event("http_retry", n) for n in range(40)]
    sent["events.http_retry"] = [e["id"] for e in retried]
    # When the same body is posted twice (two batches, two UUIDs)
    batch_ids = {post(gateway.url, retried, BATCH).body["batch_id"] for _ in range(2)}
    assert len(batch_ids) == 2

    # Given (duplicate source 2) one file, When `icefleet send` runs twice on it (no --batch-id)
    twice = tmp_path / "twice.ndjson"
    twice.write_bytes(ndjson([event("send_twice", n) for n in range(25)]))
    sent["events.send_twice"] = [f"send_twice-{n}" for n in range(25)]
    for _ in range(2):
        assert cli(env, "send", str(twice)).returncode == 0

    # Given one event, then another event under the same (source, id) with other bytes
    assert cli(env, "send", "-", stdin=ndjson([event("conflict", 1)])).returncode == 0
    sent["events.conflict"] = ["conflict-1"]
    wait_idle(redis_client, timeout_s=240)
    later = ndjson([event("conflict", 1, note="same id, other event")])
    assert cli(env, "send", "-", stdin=later).returncode == 0
    wait_idle(redis_client, timeout_s=240)

    # Then every table holds each id exactly once (pyiceberg and iceberg-rust agree)
    for table, ids in sent.items():
        landed = ids_read_back(settings, table)
        assert Counter(landed) == Counter(ids), table
    # And the repeats are counted where they happened, the conflict is a dead letter with reason
    status = cli(env, "status", "--json", "--no-workers")
    assert status.returncode == 0, status.stderr
    rows = {row["table"]: row for row in json.loads(status.stdout)["tables"]}
    counted = {
        name: (row["duplicates_dropped"], row["duplicates_conflicting"])
        for name, row in rows.items()
        if row["duplicates_dropped"] or row["duplicates_conflicting"]
    }
    assert counted == {
        "events.http_retry": (40, 0),
        "events.send_twice": (25, 0),
        "events.conflict": (0, 1),
    }
    letters = DeadLetterStore(redis_client).list(10)
    assert [(d.batch_id != "", d.attribute) for d in letters] == [(True, "id")]
    assert "duplicate with other content" in letters[0].reason
    assert b"same id, other event" in letters[0].raw
    metrics = gateway_metrics(gateway)
    assert 'icefleet_duplicates_dropped_total{table="events.http_retry"} 40.0' in metrics
    assert 'icefleet_duplicates_conflicting_total{table="events.conflict"} 1.0' in metrics


def gateway_metrics(server: Server) -> str:
    return request(f"{server.url}/metrics", headers=AUTH, method="GET").text


def test_github_webhooks_sent_twice_under_different_batch_ids_land_once(
    fleet: tuple[Fleet, dict[str, str]], redis_client: redis.Redis
) -> None:
    # Given the 172 real GitHub webhook events, and the same events again as a redelivering
    # sender sends them (same delivery ids, same bytes), and one table with dedupe off
    workers, env = fleet
    payload = WEBHOOKS.read_bytes()
    events = [json.loads(line) for line in payload.splitlines() if line.strip()]
    reused = [event("reused", n) for n in range(3)]

    # When each is sent twice under two different batch ids
    with Producer(workers.settings) as producer:
        for batch_id in ("github-delivery-1", "github-delivery-2"):
            producer.enqueue(payload, batch_id=batch_id)
            producer.enqueue(reused, batch_id=f"reused-{batch_id}")
    wait_idle(redis_client, timeout_s=240)

    # Then each (source, id) is in its table exactly once, the opted-out table holds both copies
    router = Router(workers.settings.routes, workers.settings.namespace)
    expected: dict[str, list[str]] = {}
    for item in events:
        expected.setdefault(str(router.table_for(item["type"])), []).append(item["id"])
    for table, ids in expected.items():
        assert Counter(ids_read_back(workers.settings, table)) == Counter(ids), table
    reused_ids = ids_read_back(workers.settings, "events.reused")
    assert Counter(reused_ids) == Counter({e["id"]: 2 for e in reused})
    # And the duplicates counted per table add up to the 172 events sent again
    status = cli(env, "status", "--json", "--no-workers")
    rows = json.loads(status.stdout)["tables"]
    dropped = {r["table"]: r["duplicates_dropped"] for r in rows if r["duplicates_dropped"]}
    assert dropped == {table: len(ids) for table, ids in expected.items()}
    assert sum(dropped.values()) == len(events) == 172
    assert DeadLetterStore(redis_client).count() == 0
