"""A whole icefleet stack for tests and benchmarks: settings, catalog, store, writer, committer.

:func:`make_pipeline` builds it against a Redis URL and a home directory (SQLite catalog and
local warehouse under the home), the way a worker process does. Every process builds its own: the
child-process entry points at the bottom take only plain values (URL, path, names), so they work
with the ``spawn`` start method.

Events are synthetic CloudEvents whose ``id`` says which batch they belong to
(``<batch id>-<n>``), so reading a table back (with pyiceberg, or with iceberg-rust as an
independent reader) tells which batches landed and how often. :func:`in_process_tasks` runs the
Celery tasks themselves in the test's process.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

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
from common.ingest.routing import Router, TableName
from common.lake.catalog import TableStore, open_catalog
from common.settings import Settings, load_settings
from common.write.batch_writer import BatchResult, BatchWriter

if TYPE_CHECKING:
    import pytest

    from workers.runtime import Runtime

TABLE = "events.order"
COMMITTERS_KEY = "test:committers"  # names of the looping committers that have committed
EVENT_TYPE = "com.example.order"
BASE_TIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

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
class Pipeline:
    """One process's view of icefleet: everything a writer or a committer needs."""

    settings: Settings
    client: redis.Redis
    catalog: Catalog
    store: TableStore
    registry: PendingRegistry
    writer: BatchWriter
    committer: Committer

    def write(self, batch_id: str, events: Sequence[dict[str, Any]]) -> BatchResult:
        """Write (and register) one batch, as a writer worker does."""
        return self.writer.write(batch_id, ndjson(events), enqueued_at_ms=0)

    def commit(self, table: str = TABLE) -> list[CommitResult]:
        """Commit everything pending for ``table``, as the committer does."""
        return self.committer.commit_table(table)

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


def make_settings(home: Path, redis_url: str, **overrides: Any) -> Settings:
    return load_settings(
        {}, home=Path(home), redis_url=redis_url, **{**TEST_OVERRIDES, **overrides}
    )


def make_pipeline(
    redis_url: str,
    home: Path | str,
    *,
    fault: FaultHook | None = None,
    **overrides: Any,
) -> Pipeline:
    """The full stack against ``redis_url`` with its catalog and warehouse under ``home``."""
    settings = make_settings(Path(home), redis_url, **overrides)
    client = redis.Redis.from_url(settings.redis_url)
    catalog = open_catalog(settings)
    store = TableStore(
        catalog,
        lock_factory(client, settings),
    )
    registry = PendingRegistry(client)
    writer = BatchWriter(settings, store, Router(settings.routes, settings.namespace), registry)
    committer = Committer(settings, catalog, client, registry, fault=fault)
    return Pipeline(settings, client, catalog, store, registry, writer, committer)


# --- events --------------------------------------------------------------------------------


def make_events(
    batch_id: str,
    count: int,
    *,
    event_type: str = EVENT_TYPE,
    extra: dict[str, Any] | None = None,
    day_offset: int = 0,
) -> list[dict[str, Any]]:
    """``count`` CloudEvents with ids ``<batch_id>-<n>``; ``extra`` adds ``data`` fields."""
    when = BASE_TIME + timedelta(days=day_offset)
    return [
        {
            "specversion": "1.0",
            "id": event_id(batch_id, n),
            "source": "/tests/pipeline",
            "type": event_type,
            "time": (when + timedelta(seconds=n)).isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": {"order": n, "amount": 1.5 * n, "batch": batch_id, **(extra or {})},
        }
        for n in range(count)
    ]


def event_id(batch_id: str, n: int) -> str:
    return f"{batch_id}-{n}"


def ids_of(events: Iterable[dict[str, Any]]) -> list[str]:
    return [str(e["id"]) for e in events]


def ndjson(events: Iterable[dict[str, Any]]) -> str:
    return "\n".join(orjson.dumps(e).decode() for e in events) + "\n"


# --- reading back and writing around icefleet ----------------------------------------------


def read_ids(table: Table, column: str = "id") -> list[str]:
    """Every value of ``column`` in ``table`` (a full scan with pyiceberg), duplicates included."""
    if table.current_snapshot() is None:
        return []
    arrow = table.scan(selected_fields=(column,)).to_arrow()
    return [str(v) for v in arrow.column(column).to_pylist()]


def rust_ids(table: Table, file_io: dict[str, str] | None = None) -> list[str]:
    """The ids iceberg-rust reads (pyiceberg-core's DataFusion provider), in a process of its own:
    the Rust reader holds the GIL while it waits on S3, which moto may serve from this process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(
            _rust_ids, (list(table.name()), table.metadata_location, dict(file_io or {}))
        )


def _rust_ids(identifier: list[str], metadata_location: str, file_io: dict[str, str]) -> list[str]:
    from datafusion import SessionContext
    from pyiceberg_core.datafusion import IcebergDataFusionTable

    ctx = SessionContext()
    provider = IcebergDataFusionTable(
        identifier=identifier, metadata_location=metadata_location, file_io_properties=file_io
    )
    ctx.register_table("t", provider)
    result = ctx.sql("SELECT id FROM t").to_arrow_table()
    return [str(value) for value in result.column("id").to_pylist()]


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


def local_path(uri: str) -> Path:
    """The local path of a ``file://`` URI (or of a plain path)."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else Path(uri)


def wait_until(
    predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.02
) -> None:
    """Ask ``predicate`` every ``poll_s`` seconds until it is true; ``TimeoutError`` naming
    ``what`` once ``timeout_s`` have passed."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s}s")
        time.sleep(poll_s)


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


class CommitterCrash(Exception):
    """A committer dying at a fault point, in-process (see :func:`raise_at`)."""


def raise_at(point: str) -> FaultHook:
    """A fault hook that raises :class:`CommitterCrash` at ``point``: the committer's state in
    Redis and the catalog is what a crash there leaves, and its lock is released on the way out
    (as its TTL would free it)."""

    def hook(reached: str) -> None:
        if reached == point:
            raise CommitterCrash(point)

    return hook


def crash_at(point: str, exit_code: int = 17) -> FaultHook:
    """A fault hook that kills the process the hard way (no cleanup, no ``finally``) at ``point``."""

    def hook(reached: str) -> None:
        if reached == point:
            os._exit(exit_code)

    return hook


def run_committer_until_crash(redis_url: str, home: str, table: str, point: str) -> None:
    """Commit ``table`` with a committer that dies with ``os._exit(17)`` at ``point``."""
    pipeline = make_pipeline(redis_url, home, fault=crash_at(point), lock_ttl_ms=CRASH_LOCK_TTL_MS)
    pipeline.commit(table)
    os._exit(0)  # reached only if the fault point was never hit


def run_committer_loop(
    redis_url: str, home: str, table: str, ready: Any, stop: Any, results: Any, name: str
) -> None:
    """Commit ``table`` over and over until ``stop`` is set; report what this process committed.

    Puts ``name`` on ``ready`` once set up (imports done), so the test can start the race then,
    and adds it to the Redis set :data:`COMMITTERS_KEY` once it has made a snapshot.
    """
    pipeline = make_pipeline(redis_url, home)
    committed: list[tuple[int, int, int]] = []
    pace = random.Random(name)
    ready.put(name)
    try:
        while True:
            stopping = stop.is_set()
            if pipeline.registry.pending_entries(table) or pipeline.registry.prepared(table):
                for result in pipeline.commit(table):
                    committed.append((result.seq, result.batches, result.attempts))
                    pipeline.client.sadd(COMMITTERS_KEY, name)
            if stopping:
                break
            # A random pause: the one that just released the lock must not always win it back.
            time.sleep(pace.uniform(0.0, 0.03))
    finally:
        results.put((name, committed))
        pipeline.close()


def run_outside_appender(
    redis_url: str, home: str, table: str, count: int, ready: Any, start: Any, done: Any
) -> None:
    """``count`` plain pyiceberg appends of one row each (ids ``outside-<n>``)."""
    del redis_url  # the outside writer knows nothing of Redis
    catalog = open_catalog(make_settings(Path(home), "redis://127.0.0.1:1/0"))
    ready.put("outside")
    start.wait()
    appended = 0
    for n in range(count):
        outside_append(catalog, table, [f"outside-{n}"])
        appended += 1
    done.put(appended)


def run_remove_files(
    redis_url: str, home: str, table: str, paths: list[str], start: Any, results: Any
) -> None:
    """Remove ``paths`` from ``table`` under the table lock; report ``ok`` or the error's name."""
    from common.errors import ConcurrentModificationError
    from common.maintenance.deletes import remove_data_files

    pipeline = make_pipeline(redis_url, home)
    iceberg_table = pipeline.table(table)  # loaded before the race: a stale base on purpose
    lock = TableLock(pipeline.client, table, ttl_ms=5_000, wait_s=30)
    start.wait()
    try:
        remove_data_files(iceberg_table, paths, lock=lock)
        results.put("ok")
    except ConcurrentModificationError as exc:
        results.put(f"ConcurrentModificationError: {exc.paths}")
    finally:
        pipeline.close()
