"""icefleet in one process, for tests and benchmarks: settings, catalog, store, writer, committer.

:func:`make_stack` builds it against a Redis URL and a home directory, the way a worker process
does: the embedded SQLite catalog and a local warehouse under the home, or the catalog
``ICEFLEET_CATALOG`` would name (``catalog=``, configured in the environment, see
:mod:`tests.support.catalogs`). Every process builds its own: the child-process entry points at
the bottom take only plain values (URL, path, names), so they work with the ``spawn`` start
method. :func:`in_process_tasks` runs the Celery tasks themselves in the test's process.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import redis
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.table import Table

from common.commit.committer import CommitResult, Committer, FaultHook
from common.coord.locks import TableLock, lock_factory
from common.coord.pending import PendingRegistry
from common.ingest.events import DeadLetter
from common.ingest.routing import Router, TableName
from common.lake.catalog import TableStore, open_catalog
from common.settings import Settings, load_settings
from common.write.batch_writer import BatchResult, BatchWriter
from tests.support.events import BASE_TIME, ndjson
from tests.support.faults import crash_at
from tests.support.readback import read_ids

if TYPE_CHECKING:
    import pytest

    from workers.runtime import Runtime

TABLE = "events.order"
COMMITTERS_KEY = "test:committers"  # names of the looping committers that have committed

# Fast retries and a lock TTL that survives a loaded CI machine; committers that are crashed on
# purpose take a short TTL of their own (CRASH_LOCK_TTL_MS), so their dead lock frees quickly.
CRASH_LOCK_TTL_MS = 2_000
TEST_OVERRIDES: dict[str, Any] = {
    "lock_ttl_ms": 10_000,
    "lock_wait_s": 30.0,
    "retry_base_ms": 10,
    "commit_interval_ms": 1,
}


@dataclass
class Stack:
    """One process's icefleet: everything a writer or a committer holds, on a real Redis."""

    settings: Settings
    client: redis.Redis
    catalog: Catalog
    store: TableStore
    registry: PendingRegistry
    writer: BatchWriter
    committer: Committer
    dead: list[DeadLetter] = field(default_factory=list)  # dead letters the writer produced

    def write(self, batch_id: str, events: Sequence[dict[str, Any]]) -> BatchResult:
        """Write (and register) one batch, as a writer worker does."""
        return self.writer.write(batch_id, ndjson(events), enqueued_at_ms=0)

    def commit(self, table: str = TABLE) -> list[CommitResult]:
        """Commit everything pending for ``table``, as the committer does."""
        return self.committer.commit_table(table)

    def commit_all(self) -> None:
        """Commit every table with something pending."""
        for table in sorted(self.committer.pending_tables()):
            self.committer.commit_table(table)

    def committer_with(self, fault: FaultHook) -> Committer:
        """Another committer on the same catalog and Redis, whose fault hook is ``fault``."""
        return Committer(self.settings, self.catalog, self.client, self.registry, fault=fault)

    def table(self, name: str = TABLE) -> Table:
        """A freshly loaded table."""
        return self.catalog.load_table(TableName.parse(name).parts)

    def ids(self, name: str = TABLE) -> list[str]:
        """Every ``id`` in the table, duplicates included."""
        return read_ids(self.table(name))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_settings(
    home: Path, redis_url: str, catalog: str | None = None, **overrides: Any
) -> Settings:
    """Settings with :data:`TEST_OVERRIDES` (then ``overrides``); ``ICEFLEET_*`` variables of
    this process are not read, so a developer's environment cannot change a test."""
    return load_settings(
        {},
        home=Path(home),
        redis_url=redis_url,
        catalog_name=catalog,
        **{**TEST_OVERRIDES, **overrides},
    )


def make_stack(
    redis_url: str,
    home: Path | str,
    *,
    catalog: str | None = None,
    fault: FaultHook | None = None,
    **overrides: Any,
) -> Stack:
    """The full stack against ``redis_url``, its catalog the one named ``catalog`` (configured in
    the environment) or the embedded one under ``home``; ``overrides`` replace settings."""
    settings = make_settings(Path(home), redis_url, catalog, **overrides)
    client = redis.Redis.from_url(settings.redis_url)
    catalog_ = open_catalog(settings)
    store = TableStore(
        catalog_,
        lock_factory(client, settings),
    )
    registry = PendingRegistry(client)
    dead: list[DeadLetter] = []
    router = Router(settings.routes, settings.namespace)
    writer = BatchWriter(settings, store, router, registry, dead.extend)
    committer = Committer(settings, catalog_, client, registry, fault=fault)
    return Stack(settings, client, catalog_, store, registry, writer, committer, dead)


# --- another writer: plain pyiceberg, knowing nothing of icefleet ------------------------------


def outside_rows(table: Table, ids: Sequence[str]) -> pa.Table:
    """Rows with the given ids that fit the table's current schema, as another tool would write."""
    schema = schema_to_pyarrow(table.schema())
    now = datetime.now(UTC)
    rows = []
    for n, row_id in enumerate(ids):
        raw = {"id": row_id, "source": "/outside", "type": "outside.append", "specversion": "1.0"}
        rows.append(
            {
                **raw,
                "time": BASE_TIME + timedelta(minutes=n),
                "raw_event": orjson.dumps(raw).decode(),
                "_ingested_at": now,
                "_batch_id": "outside",
            }
        )
    return pa.Table.from_pylist(
        [{f.name: row.get(f.name) for f in schema} for row in rows], schema=schema
    )


def outside_append(catalog: Catalog, name: str, ids: Sequence[str], attempts: int = 20) -> Table:
    """A plain pyiceberg ``table.append`` that knows nothing of icefleet's protocol.

    Like any careful user it tries again when pyiceberg gives up on a conflict (which guarantees
    that the append did not land).
    """
    for attempt in range(attempts):
        table = catalog.load_table(TableName.parse(name).parts)
        try:
            table.append(outside_rows(table, ids))
            return table
        except CommitFailedException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


# --- the Celery tasks in this process ------------------------------------------------------


@contextmanager
def in_process_tasks(
    client: redis.Redis, redis_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runtime]:
    """The tasks run in this process (``task.apply``) against ``client``'s Redis, with a runtime
    of their own and writer retries that do not back off; the messages they send (commit tasks,
    child batches) stay in their queues. The commit interval is 60 s."""
    import workers.runtime
    import workers.tasks.write
    from workers.app import create_app
    from workers.runtime import Runtime

    settings = load_settings({}, redis_url=redis_url, home=home, commit_interval_ms=60_000)
    app = create_app(settings)
    rt = Runtime(settings, client)
    monkeypatch.setattr(workers.runtime, "_runtime", rt)
    monkeypatch.setattr(workers.tasks.write, "backoff_s", lambda attempt: 0.0)
    yield rt
    app.close()


# --- child-process entry points (spawn imports them by name) ----------------------------------


def run_committer_until_crash(
    redis_url: str, home: str, table: str, point: str, catalog: str | None = None
) -> None:
    """Commit ``table`` with a committer that dies with ``os._exit(17)`` at ``point``."""
    stack = make_stack(
        redis_url, home, catalog=catalog, fault=crash_at(point), lock_ttl_ms=CRASH_LOCK_TTL_MS
    )
    stack.commit(table)
    os._exit(0)  # reached only if the fault point was never hit


def run_committer_loop(
    redis_url: str,
    home: str,
    table: str,
    ready: Any,
    stop: Any,
    results: Any,
    name: str,
    catalog: str | None = None,
) -> None:
    """Commit ``table`` over and over until ``stop`` is set; report what this process committed.

    Puts ``name`` on ``ready`` once set up (imports done), so the test can start the race then,
    and adds it to the Redis set :data:`COMMITTERS_KEY` once it has made a snapshot.
    """
    stack = make_stack(redis_url, home, catalog=catalog)
    committed: list[tuple[int, int, int]] = []
    pace = random.Random(name)
    ready.put(name)
    try:
        while True:
            stopping = stop.is_set()
            if stack.registry.pending_entries(table) or stack.registry.prepared(table):
                for result in stack.commit(table):
                    committed.append((result.seq, result.batches, result.attempts))
                    stack.client.sadd(COMMITTERS_KEY, name)
            if stopping:
                break
            # A random pause: the one that just released the lock must not always win it back.
            time.sleep(pace.uniform(0.0, 0.03))
    finally:
        results.put((name, committed))
        stack.close()


def run_outside_appender(
    home: str, table: str, count: int, ready: Any, start: Any, done: Any, catalog: str | None = None
) -> None:
    """``count`` plain pyiceberg appends of one row each (ids ``outside-<n>``); the outside
    writer knows nothing of Redis."""
    opened = open_catalog(make_settings(Path(home), "redis://127.0.0.1:1/0", catalog))
    ready.put("outside")
    start.wait()
    appended = 0
    for n in range(count):
        outside_append(opened, table, [f"outside-{n}"])
        appended += 1
    done.put(appended)


def run_remove_files(
    redis_url: str,
    home: str,
    table: str,
    paths: list[str],
    start: Any,
    results: Any,
    catalog: str | None = None,
) -> None:
    """Remove ``paths`` from ``table`` under the table lock; report ``ok`` or the error's name."""
    from common.errors import ConcurrentModificationError
    from common.maintenance.deletes import remove_data_files

    stack = make_stack(redis_url, home, catalog=catalog)
    iceberg_table = stack.table(table)  # loaded before the race: a stale base on purpose
    lock = TableLock(stack.client, table, ttl_ms=5_000, wait_s=30)
    start.wait()
    try:
        remove_data_files(iceberg_table, paths, lock=lock)
        results.put("ok")
    except ConcurrentModificationError as exc:
        results.put(f"ConcurrentModificationError: {exc.paths}")
    finally:
        stack.close()
