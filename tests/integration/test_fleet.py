"""The fleet end to end: real redis-server, real Celery worker processes, real catalogs.

Two writers and a committer (``icefleet worker ...`` subprocesses, each in a process group of its
own, killed at teardown) land 50,000 events of three types sent in 50 batches. Each table must
then hold exactly its events, read back with pyiceberg and with the independent iceberg-rust
reader (pyiceberg-core's DataFusion provider), and a batch enqueued twice, and again after it was
committed, lands once. The same test runs on the embedded SQLite catalog, a PostgreSQL catalog,
and a SQLite catalog whose warehouse is S3 on moto's server.

The CLI is exercised as a user runs it: ``demo`` (and Ctrl-C during it), ``up`` with Flower and
a worker killed under it, ``send``, ``wait``, ``status --json``; after each, no process it
started may be left.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from common.coord.deadletters import DeadLetterStore
from common.ingest.events import encode_ndjson
from common.ingest.producer import Producer
from common.lake.catalog import open_catalog
from common.settings import load_settings
from tests.support.catalogs import (
    CatalogBackend,
    postgres_backend,
    s3_backend,
    sqlite_backend,
)
from tests.support.events import expected_by_table
from tests.support.readback import rust_ids
from tests.support.services import S3Endpoint, free_port, wait_until
from tests.support.stack import in_process_tasks
from workers.app import create_app
from workers.cli.demo import synthetic_events
from workers.fleet import Fleet

pytestmark = pytest.mark.integration

BATCHES = 50
PER_BATCH = 1_000
DUPLICATE = 7
WAIT_S = 120.0
CLI = [sys.executable, "-m", "workers.cli.main"]


@pytest.fixture(params=["sqlite", "postgres", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> CatalogBackend:
    if request.param == "sqlite":
        return sqlite_backend()
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_catalog_url")
        return postgres_backend(url, tmp_path / "warehouse", name="fleetpg")
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    bucket: str = request.getfixturevalue("s3_bucket")
    return s3_backend(endpoint, bucket, tmp_path / "catalog.db", name="fleets3")


def processes_with(marker: str) -> list[int]:
    """Live processes (not this one) whose environment mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=dict(os.environ), capture_output=True, text=True, timeout=timeout_s
    )


# --- the fleet lands every event exactly once -------------------------------------------------------


def test_fleet_lands_every_event_exactly_once(
    fleet: Fleet, backend: CatalogBackend, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given 50,000 events of three types, and a running fleet of 2 writers and a committer
    settings = fleet.settings
    events = list(synthetic_events(BATCHES * PER_BATCH, seed=11, run_id=backend.kind))
    expected = {name: set(ids) for name, ids in expected_by_table(settings, events).items()}
    assert len(expected) == 3
    batches = [events[n * PER_BATCH : (n + 1) * PER_BATCH] for n in range(BATCHES)]
    started = time.monotonic()

    # When they are enqueued in 50 batches, one of them twice in a row
    with Producer(settings) as producer:
        for n, batch in enumerate(batches):
            assert producer.enqueue(batch, batch_id=f"batch-{n}") == f"batch-{n}"
        producer.enqueue(batches[DUPLICATE], batch_id=f"batch-{DUPLICATE}")
        result = producer.wait(timeout_s=WAIT_S)
        assert result.done, result.describe()
        landed_s = time.monotonic() - started

        # ... and once more through the CLI after it was committed, the same bytes the producer
        # sent (a batch id is bound to its content: other bytes under it would be refused)
        duplicate = tmp_path / "duplicate.ndjson"
        duplicate.write_text(encode_ndjson(batches[DUPLICATE]))
        sent = run_cli("send", str(duplicate), "--batch-id", f"batch-{DUPLICATE}")
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.split() == [f"batch-{DUPLICATE}"]
        waited = run_cli("wait", "--timeout", "60")
        assert waited.returncode == 0, waited.stdout + waited.stderr

    # Then each table holds exactly its events, as pyiceberg and iceberg-rust both read them
    catalog = open_catalog(settings)
    for name, ids in sorted(expected.items()):
        table = catalog.load_table(tuple(name.split(".")))
        with_pyiceberg = table.scan(selected_fields=("id",)).to_arrow().column("id").to_pylist()
        assert len(with_pyiceberg) == len(ids), name
        assert set(with_pyiceberg) == ids, name
        with_rust = rust_ids(table, backend.file_io)
        assert sorted(with_rust) == sorted(ids), name
    assert DeadLetterStore(redis_client).count() == 0

    # ... and status reports the same tables, nothing pending, the workers alive
    status = run_cli("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["backlog"]["idle"] is True
    assert {row["table"]: row["rows"] for row in report["tables"]} == {
        name: len(ids) for name, ids in expected.items()
    }
    assert {w.split("@")[0] for w in report["workers"]} == {"writer1", "writer2", "committer"}
    print(f"{backend.kind}: {len(events):,} events committed in {landed_s:.1f}s")


# --- the CLI as a user runs it -----------------------------------------------------------------------


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    env.update({"ICEFLEET_HOME": str(home), **extra})
    return env


def test_demo_runs_end_to_end_and_leaves_no_process(tmp_path: Path) -> None:
    # Given nothing configured but a home of its own (the demo spawns its own redis-server)
    home = tmp_path / "home"

    # When the demo runs
    result = subprocess.run(
        [*CLI, "demo", "--events", "3000", "--writers", "2", "--batch-size", "500"],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=180,
    )

    # Then it reports every event committed, and nothing it started is still running
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3,000 events committed" in result.stdout
    for table in ("events.page_view", "events.order_placed", "events.user_signed_up"):
        assert table in result.stdout
    assert (home / "redis" / "appendonlydir").is_dir()  # Redis ran with AOF under ICEFLEET_HOME
    assert processes_with(str(home)) == []


def test_demo_interrupted_stops_everything(tmp_path: Path) -> None:
    # Given a demo that is busy sending a lot of events
    home = tmp_path / "home"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "demo", "--events", "500000", "--batch-size", "500"],
            env=cli_env(home),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_until(lambda: "fleet up" in stderr.read_text(), 90, "the fleet to start", poll_s=0.2)
        time.sleep(1.0)
        assert len(processes_with(str(home))) >= 4  # redis, 2 writers, committer (+ children)

        # When it gets Ctrl-C
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    # Then it exits 130 and nothing it started is left
    assert code == 130, stderr.read_text()
    assert processes_with(str(home)) == []


def test_up_restarts_a_dead_worker_and_serves_flower(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    pytest.importorskip("flower")
    # Given `icefleet up` with one writer and Flower, on the test Redis
    home = tmp_path / "home"
    port = free_port()
    stderr = tmp_path / "stderr.txt"
    settings = load_settings({}, redis_url=redis_url, home=home)
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "up", "--writers", "1", "--flower", "--flower-port", str(port)],
            env=cli_env(home, ICEFLEET_REDIS_URL=redis_url, ICEFLEET_FLOWER_BASIC_AUTH=FLOWER_AUTH),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    app = create_app(settings)
    try:
        wait_until(
            lambda: "Ctrl-C stops everything" in stderr.read_text(), 90, "the fleet", poll_s=0.2
        )
        first = writer_pid(app)

        # When the writer process is killed
        os.kill(first, signal.SIGKILL)

        # Then `up` starts a new one, and Flower lists the workers
        wait_until(lambda: writer_pid(app) not in (None, first), 60, "a new writer1", poll_s=0.2)
        assert "restarted writer1" in stderr.read_text()
        wait_until(lambda: flower_lists(port, ("writer1@", "committer@")), 60, "Flower", poll_s=0.2)

        # And Ctrl-C stops all of it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, stderr.read_text()
    finally:
        app.close()
        if proc.poll() is None:
            proc.kill()
    assert processes_with(str(home)) == []


def writer_pid(app: Any) -> int | None:
    stats = app.control.inspect(timeout=1.0).stats() or {}
    for name, info in stats.items():
        if name.startswith("writer1@"):
            return int(info["pid"])
    return None


FLOWER_AUTH = "tester:flower-test-password"


def flower_lists(port: int, names: tuple[str, ...]) -> bool:
    """Whether Flower (basic auth: it is never open) lists every one of ``names``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workers",
        headers={"Authorization": "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode()},
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            page = reply.read().decode()
    except OSError:
        return False
    return all(name in page for name in names)


# --- the tasks in this process (eager), on the real Redis -------------------------------------------


@dataclass
class FakeFile:
    record_count: int


class ScriptedWriter:
    """A BatchWriter stand-in: raises ``errors`` in turn, then ``always`` (if given) on every
    call, else writes ``rows`` rows to ``events.t``."""

    def __init__(self, *errors: BaseException, always: BaseException | None = None) -> None:
        self.errors = list(errors)
        self.always = always
        self.table = "events.t"
        self.rows = 5
        self.calls = 0

    def write(self, batch_id: str, payload: str, **_: Any) -> Any:
        from common.write.batch_writer import BatchResult

        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        if self.always is not None:
            raise self.always
        return BatchResult(batch_id, events=self.rows, files={self.table: [FakeFile(self.rows)]})


@pytest.fixture
def eager(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The tasks run in this process against the test Redis; commit tasks they send stay queued."""
    with in_process_tasks(redis_client, redis_url, tmp_path / "home", monkeypatch) as rt:
        yield rt


def enqueue_outstanding(client: redis.Redis, batch_id: str) -> None:
    from common.coord import keys

    client.zadd(keys.outstanding(), {batch_id: 1})


def commit_messages(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw)["headers"] for raw in client.lrange("commit", 0, -1)]


def test_write_task_retries_transient_errors_then_nudges_once(
    eager: Any, redis_client: redis.Redis
) -> None:
    from common.coord import keys
    from workers.tasks.write import write_batch

    # Given a writer whose storage fails twice before it works
    eager._writer = ScriptedWriter(OSError("S3 503"), OSError("S3 503"))
    enqueue_outstanding(redis_client, "b1")

    # When the batch is written, then 20 more batches for the same table
    result = write_batch.apply(kwargs={"batch_id": "b1", "payload": "{}\n"}).get()
    for n in range(20):
        write_batch.apply(kwargs={"batch_id": f"more-{n}", "payload": "{}\n"}).get()

    # Then it took three attempts, nothing is outstanding, and one commit task was sent
    assert result["records"] == 5 and result["files"] == {"events.t": 1}
    assert eager._writer.calls == 3 + 20
    assert redis_client.zcard(keys.outstanding()) == 0
    assert redis_client.hlen(keys.deliveries()) == 0
    messages = commit_messages(redis_client)
    assert len(messages) == 1
    assert messages[0]["task"] == "icefleet.commit_table"
    assert redis_client.get(keys.nudge("events.t")).decode() == messages[0]["id"]


def test_write_task_dead_letters_a_batch_that_keeps_failing(
    eager: Any, redis_client: redis.Redis
) -> None:
    from common.coord import keys
    from workers.tasks.write import MAX_ATTEMPTS_UNEXPECTED, write_batch

    eager._writer = ScriptedWriter(always=ValueError("a bug"))
    enqueue_outstanding(redis_client, "poison")

    result = write_batch.apply(
        kwargs={"batch_id": "poison", "payload": '{"id":"x"}\n', "table": "events.t"}
    ).get()

    assert eager._writer.calls == MAX_ATTEMPTS_UNEXPECTED
    assert "ValueError: a bug" in result["dead_lettered"]
    [letter] = DeadLetterStore(redis_client).list()
    assert (letter.batch_id, letter.raw, letter.table) == ("poison", b'{"id":"x"}\n', "events.t")
    assert redis_client.zcard(keys.outstanding()) == 0
    assert commit_messages(redis_client) == []


def test_write_task_dead_letters_a_batch_delivered_too_often(
    eager: Any, redis_client: redis.Redis
) -> None:
    from common.coord import keys
    from workers.tasks.write import MAX_ATTEMPTS, write_batch

    # Given a batch whose worker was killed under it MAX_ATTEMPTS times
    eager._writer = ScriptedWriter()
    redis_client.hset(keys.deliveries(), "oom", MAX_ATTEMPTS)

    result = write_batch.apply(kwargs={"batch_id": "oom", "payload": "{}\n"}).get()

    assert "without finishing" in result["dead_lettered"]
    assert eager._writer.calls == 0
    assert DeadLetterStore(redis_client).count() == 1


def test_write_task_requeues_when_redis_fails_outside_the_write(
    eager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import Reject
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from workers.tasks.write import write_batch

    eager.client = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    with pytest.raises(Reject) as raised:
        write_batch.run(batch_id="b", payload="{}\n")
    assert raised.value.requeue


def test_commit_task_reschedules_itself_until_the_batches_are_due(
    eager: Any, redis_client: redis.Redis
) -> None:
    from common.commit.committer import Committer
    from common.coord import keys
    from common.coord.pending import PendingEntry, PendingRegistry
    from workers.tasks.commit import commit_all, commit_table

    # Given a table that committed just now, a pending batch that is therefore far from due
    # (interval 60 s: commits are paced from the last one), and the nudge its writer sent
    table = "events.t"
    registry = PendingRegistry(redis_client)
    registry.register(table, "b0", PendingEntry.of("b0", []).to_json())
    registry.finish_commit(table, ["b0"], int(time.time() * 1000))
    registry.register(table, "b1", PendingEntry.of("b1", []).to_json())
    eager._committer = Committer(eager.settings, open_catalog(eager.settings), redis_client)
    first = commit_table.apply_async([table], task_id="commit-first")  # what a writer sends
    redis_client.set(keys.nudge(table), "commit-first")

    # When that commit task runs
    assert commit_table.apply(args=[table], task_id=first.id).get() == []

    # Then it committed nothing and claimed a follow-up, scheduled for when the batch is due
    messages = commit_messages(redis_client)
    assert len(messages) == 2
    follow_up = messages[0]  # LPUSH: newest first
    assert follow_up["eta"] is not None
    assert redis_client.get(keys.nudge(table)).decode() == follow_up["id"] != "commit-first"
    assert 60_000 < redis_client.pttl(keys.nudge(table)) <= 120_000

    # ... and a sweep does not add a third while that one is on its way
    assert commit_all.apply().get() == []
    assert len(commit_messages(redis_client)) == 2
