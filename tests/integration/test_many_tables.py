"""Commits that scale with tables (workers/tasks/commit.py): one batch fanning out to many tables
is nudged in groups, committed in a committer process' threads, each table exactly once.

The tasks run in this process (``task.apply``) against a real redis-server and a real catalog
(SQLite, then PostgreSQL); the commit messages they send stay in their queue, where the tests
read them. Nothing here depends on how fast the machine is: concurrency is forced (a barrier
holds every commit thread until all have started), never raced.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.coord import keys
from common.coord.pending import PendingEntry, PendingRegistry
from common.coord.replies import as_text
from common.errors import RetryableError
from common.ingest.routing import TableName
from tests.support.catalogs import CatalogBackend
from tests.support.events import ndjson
from tests.support.readback import assert_exactly_once
from tests.support.stack import in_process_tasks
from workers.runtime import Runtime
from workers.tasks import commit as commit_tasks
from workers.tasks.commit import TABLES_PER_TASK, commit_all, commit_table, nudge_tables

TABLES = 20


@pytest.fixture
def rt(
    catalog_backend: CatalogBackend,
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Runtime]:
    """Tasks in this process on ``catalog_backend``; commit interval 60 s."""
    with in_process_tasks(redis_client, redis_url, tmp_path / "home", monkeypatch) as runtime:
        yield runtime


def fan_out(rt: Runtime, batch_id: str, tables: int = TABLES, per_table: int = 3) -> list[str]:
    """One batch whose events spread over ``tables`` tables, written and registered by the
    real writer; returns the tables, in order."""
    events = [
        {
            "specversion": "1.0",
            "id": f"{batch_id}-{n}",
            "source": "/tests/many",
            "type": f"com.tests.many.t{n % tables:03d}",
            "time": "2024-05-01T12:00:00Z",
            "data": {"n": n},
        }
        for n in range(tables * per_table)
    ]
    result = rt.writer.write(batch_id, ndjson(events), enqueued_at_ms=int(time.time() * 1000))
    assert len(result.files) == tables
    return sorted(result.files)


def commit_messages(client: redis.Redis) -> list[dict[str, Any]]:
    """The commit tasks waiting in their queue: id and the tables each carries."""
    messages = []
    for raw in client.lrange("commit", 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        messages.append({"id": message["headers"]["id"], "tables": args})
    return messages


def ids_sent(batch_id: str, table: str, tables: int = TABLES, per_table: int = 3) -> list[str]:
    index = int(table.rsplit("t", 1)[1])
    return [f"{batch_id}-{n}" for n in range(tables * per_table) if n % tables == index]


def test_a_fan_out_is_nudged_in_groups_whose_claims_name_their_task(
    rt: Runtime, redis_client: redis.Redis
) -> None:
    # Given a batch written to 20 tables
    tables = fan_out(rt, "b1")

    # When its writer nudges the committer for them
    nudge_tables(rt, tables)

    # Then 3 commit tasks carry them, 8 tables at most each, every table once, and each
    # table's claim names the task that carries it
    messages = commit_messages(redis_client)
    assert sorted(len(m["tables"]) for m in messages) == [4, TABLES_PER_TASK, TABLES_PER_TASK]
    assert sorted(t for m in messages for t in m["tables"]) == tables
    for message in messages:
        for table in message["tables"]:
            assert as_text(redis_client.get(keys.nudge(table))) == message["id"]

    # ... and a second nudge while they are on their way sends nothing more
    nudge_tables(rt, tables)
    assert len(commit_messages(redis_client)) == 3


def test_one_task_commits_many_tables_at_once_each_exactly_once(
    rt: Runtime, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch written to 20 tables, whose first commit is due at once (none of them
    # committed within the interval), and commit threads that all wait for each other before
    # committing (so they are all inside a commit at the same moment)
    tables = fan_out(rt, "b1")
    threads = commit_tasks.COMMIT_THREADS
    barrier = threading.Barrier(threads, timeout=120)
    commit = rt.committer.commit_table
    threads_seen: set[int] = set()
    calls = 0
    guard = threading.Lock()

    def together(table: str, **kwargs: Any) -> Any:
        nonlocal calls
        with guard:
            calls += 1
            first_wave = calls <= threads
            threads_seen.add(threading.get_ident())
        if first_wave:  # the first commits wait until one per thread has started
            barrier.wait()
        return commit(table, **kwargs)

    monkeypatch.setattr(rt.committer, "commit_table", together)

    # When one commit task carries all of them
    summaries = commit_table.apply(args=tables).get()

    # Then each table got one snapshot (seq 1) of its part of the batch, made by several
    # threads; nothing is pending or prepared, and no follow-up was sent
    assert sorted(s["table"] for s in summaries) == tables
    assert {s["seq"] for s in summaries} == {1}
    assert len(threads_seen) == threads
    registry = PendingRegistry(redis_client)
    assert registry.pending_tables() == set()
    assert not [t for t in tables if registry.prepared(t) is not None]
    assert commit_messages(redis_client) == []
    # ... and read back row by row, every event is in its table once
    for table in tables:
        loaded = rt.catalog.load_table(TableName.parse(table).parts)
        assert len(loaded.snapshots()) == 1
        assert_exactly_once(loaded, ids_sent("b1", table))


def test_two_committers_on_the_same_tables_commit_each_batch_once(
    rt: Runtime, redis_client: redis.Redis
) -> None:
    # Given two batches written to the same 20 tables
    tables = fan_out(rt, "b1")
    fan_out(rt, "b2")

    # When two commit tasks carrying the same tables run at the same time (a duplicate nudge,
    # a sweep), in threads of their own
    results: list[list[dict[str, Any]]] = []
    start = threading.Barrier(2, timeout=60)

    def run() -> None:
        start.wait()
        results.append(commit_table.apply(args=tables).get())

    runners = [threading.Thread(target=run) for _ in range(2)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(timeout=300)

    # Then each table was committed once, in one snapshot holding both batches (the table
    # lock kept its commits serial: the second task found nothing left to commit)
    summaries = [s for r in results for s in r]
    assert sorted(s["table"] for s in summaries) == tables
    assert all(s["batches"] == 2 and s["seq"] == 1 for s in summaries)
    for table in tables:
        loaded = rt.catalog.load_table(TableName.parse(table).parts)
        assert len(loaded.snapshots()) == 1
        assert_exactly_once(loaded, ids_sent("b1", table) + ids_sent("b2", table))
    assert PendingRegistry(redis_client).pending_tables() == set()


def test_a_table_that_fails_is_retried_alone(
    rt: Runtime, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three tables with a pending batch each, and a catalog that fails the first commit
    # of one of them with an error that passes
    tables = fan_out(rt, "b1", tables=3)
    flaky = tables[1]
    commit = rt.committer.commit_table
    calls: list[str] = []

    def failing_once(table: str, **kwargs: Any) -> Any:
        calls.append(table)
        if table == flaky and calls.count(flaky) == 1:
            raise RetryableError(f"{table}: catalog busy")
        return commit(table, **kwargs)

    monkeypatch.setattr(rt.committer, "commit_table", failing_once)
    # the retry policy inside the task would retry it at once: let the task's retry show
    monkeypatch.setattr(commit_tasks, "is_transient_unless_locked", lambda exc: False)

    # When one commit task carries the three
    commit_table.apply(args=tables, retries=0).get()

    # Then the others were committed once, and the task ran again for the failed table only,
    # which then committed
    assert sorted(calls) == sorted([*tables, flaky])
    for table in tables:
        loaded = rt.catalog.load_table(TableName.parse(table).parts)
        assert len(loaded.snapshots()) == 1
        assert_exactly_once(loaded, ids_sent("b1", table, tables=3))


def test_commits_are_paced_from_the_last_one(rt: Runtime, redis_client: redis.Redis) -> None:
    table = "events.paced"
    registry = PendingRegistry(redis_client)
    interval_ms = rt.settings.commit_interval_ms  # 60 s
    now_ms = int(time.time() * 1000)

    # Given a table with no commit in the dedup window and a batch registered just now
    registry.register(table, "b1", PendingEntry.of("b1", []).to_json())
    # Then it is due at once: the interval does not hold back a table that has been quiet
    assert rt.committer.due_in_ms(table, now_ms) == 0

    # Given instead that the table committed just now
    registry.finish_commit(table, ["b1"], now_ms)
    registry.register(table, "b2", PendingEntry.of("b2", []).to_json())
    # Then the next batch waits for the interval since that commit
    wait_ms = rt.committer.due_in_ms(table, now_ms)
    assert wait_ms is not None and interval_ms - 1_000 < wait_ms <= interval_ms
    # ... and is due once the interval has passed
    assert rt.committer.due_in_ms(table, now_ms + interval_ms) == 0

    # Given nothing pending, then nothing is due
    registry.remove(table, ["b2"])
    assert rt.committer.due_in_ms(table, now_ms) is None


def test_the_sweep_commits_many_tables_in_the_commit_threads(
    rt: Runtime, redis_client: redis.Redis
) -> None:
    # Given a batch written to 20 tables and no nudge at all (its messages were lost)
    tables = fan_out(rt, "b1")

    # When the sweep runs
    summaries = commit_all.apply().get()

    # Then every table is committed once
    assert sorted(s["table"] for s in summaries) == tables
    for table in tables:
        loaded = rt.catalog.load_table(TableName.parse(table).parts)
        assert_exactly_once(loaded, ids_sent("b1", table))
    assert PendingRegistry(redis_client).pending_tables() == set()
