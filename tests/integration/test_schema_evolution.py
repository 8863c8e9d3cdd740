"""Schema evolution through the real stack: rename with aliases, migration semantics, and five
concurrent schema changes of one table serialised by the table lock; on the SQLite and the
PostgreSQL catalog (``catalog_backend``), which take schema commits each their own way."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import redis

from common.coord.locks import TableLock
from common.ingest.events import encode_ndjson
from common.schema.evolution import rename_data_field
from common.schema.layout import ENVELOPE_COLUMNS
from tests.support.catalogs import CatalogBackend
from tests.support.stack import Stack, make_stack

pytestmark = pytest.mark.integration


def stack(home: Path, redis_url: str, catalog: str | None) -> Stack:
    """A writer and a committer on ``catalog`` whose lock waits outlast five racing changes."""
    # dedupe off: the racing writers send events under one id with other columns on purpose
    return make_stack(redis_url, home, catalog=catalog, lock_wait_s=60, dedupe=False)


def ev(i: int, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"u-{i}",
        "source": "/t",
        "type": "com.example.user",
        "time": "2024-01-01T00:00:00Z",
        "data": data,
    }


def rows_by_id(pipe: Stack) -> dict[str, dict[str, Any]]:
    table = pipe.table("events.user")
    return {r["id"]: r for r in table.scan().to_arrow().to_pylist()}


def test_rename_keeps_old_rows_and_routes_the_old_key(
    icefleet_home: Path, redis_url: str, redis_client: redis.Redis, catalog_backend: CatalogBackend
) -> None:
    # Given a table with rows carrying the data key user
    pipe = stack(icefleet_home, redis_url, catalog_backend.catalog_name)
    writer, committer = pipe.writer, pipe.committer
    writer.write("b1", encode_ndjson([ev(1, user="ann", age=3)]))
    committer.commit_table("events.user")
    # When the column user is renamed to login under the lock
    table = committer.catalog.load_table(("events", "user"))
    with TableLock(redis_client, "events.user"):
        rename_data_field(table, "user", "login")
    # And new events arrive with the old key and with the new one
    # (the writer's cached table is stale: an unknown key makes it re-read the table under the lock)
    writer.write("b2", encode_ndjson([ev(2, user="bob"), ev(3, login="cy", extra=True)]))
    committer.commit_table("events.user")
    # Then old rows read under the new name, and both new events land in it
    rows = rows_by_id(pipe)
    assert {k: rows[k]["login"] for k in rows} == {"u-1": "ann", "u-2": "bob", "u-3": "cy"}
    assert "user" not in rows["u-2"]
    assert rows["u-2"]["_rescued_data"] is None
    # And a column added later reads null for earlier rows (migration semantics)
    assert rows["u-1"]["extra"] is None and rows["u-3"]["extra"] is True


def _add_field(home: str, redis_url: str, key: str, catalog: str | None) -> None:
    stack(Path(home), redis_url, catalog).writer.write(
        f"batch-{key}", encode_ndjson([ev(100, **{key: 1})])
    )


def test_five_concurrent_schema_changes_all_apply(
    icefleet_home: Path, redis_url: str, redis_client: redis.Redis, catalog_backend: CatalogBackend
) -> None:
    # Given a table that exists
    catalog = catalog_backend.catalog_name
    pipe = stack(icefleet_home, redis_url, catalog)
    writer, committer = pipe.writer, pipe.committer
    writer.write("seed", encode_ndjson([ev(0, base=0)]))
    # When five processes each add a different column at the same time
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_add_field, args=(str(icefleet_home), redis_url, f"col{i}", catalog))
        for i in range(5)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 5
    # Then every column exists once, and every batch commits
    table = committer.catalog.load_table(("events", "user"))
    data = [f.name for f in table.schema().fields if f.name not in ENVELOPE_COLUMNS]
    assert sorted(data) == ["base", *[f"col{i}" for i in range(5)]]
    committer.commit_table("events.user")
    rows = committer.catalog.load_table(("events", "user")).scan().to_arrow()
    assert rows.num_rows == 6


def test_evolve_command_renames_through_the_lock(
    icefleet_home: Path, redis_url: str, redis_client: redis.Redis, catalog_backend: CatalogBackend
) -> None:
    from click.testing import CliRunner

    from workers.cli.main import main

    # Given a table with a data column user (the CLI finds the catalog in the environment)
    pipe = stack(icefleet_home, redis_url, catalog_backend.catalog_name)
    writer, committer = pipe.writer, pipe.committer
    writer.write("c1", encode_ndjson([ev(1, user="ann")]))
    committer.commit_table("events.user")
    env = {"ICEFLEET_HOME": str(icefleet_home), "ICEFLEET_REDIS_URL": redis_url}
    runner = CliRunner()
    # When the operator renames it from the CLI
    done = runner.invoke(main, ["evolve", "events.user", "--rename", "user=login"], env=env)
    # Then it is renamed and the old rows read under the new name
    assert done.exit_code == 0, done.output
    assert "renamed user -> login" in done.output
    assert rows_by_id(pipe)["u-1"]["login"] == "ann"
    # And mistakes are refused with a clear message, changing nothing
    again = runner.invoke(main, ["evolve", "events.user", "--rename", "user=login"], env=env)
    assert again.exit_code != 0 and "not a data column" in again.output
    clash = runner.invoke(main, ["evolve", "events.user", "--rename", "login=id"], env=env)
    assert clash.exit_code != 0 and "already a column" in clash.output
    bad = runner.invoke(main, ["evolve", "events.user", "--rename", "nonsense"], env=env)
    assert bad.exit_code != 0 and "OLD=NEW" in bad.output
    empty = runner.invoke(main, ["evolve", "events.user"], env=env)
    assert empty.exit_code != 0 and "nothing to do" in empty.output
    hostile = runner.invoke(main, ["evolve", "../etc.passwd", "--rename", "a=b"], env=env)
    assert hostile.exit_code != 0 and "invalid identifier" in hostile.output
