"""Table maintenance end to end: many small batches through the real write and commit paths, then
``icefleet compact``, ``expire-snapshots``, ``remove-orphans``, ``verify``, ``delete`` and
``sync-catalog`` as a user runs them, read back with pyiceberg and the independent iceberg-rust
reader; the beat tasks in-process on real Redis; the same on an S3 warehouse (moto).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
import redis
from click.testing import CliRunner, Result

from common.commit.committer import committed_seq
from common.lake.catalog import open_catalog
from common.maintenance.deletes import live_data_files
from common.maintenance.invariants import validate_lineage
from common.maintenance.orphans import canonical_path, pending_paths
from common.settings import load_settings
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.stack import TABLE, Stack, make_stack
from workers.cli.main import main

pytestmark = pytest.mark.integration

BATCHES = 80
PER_BATCH = 25


@pytest.fixture
def pipe(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    """The pipeline, and the environment the CLI reads: the same home and Redis."""
    home = tmp_path / "home"
    pipeline = make_stack(redis_url, home)
    monkeypatch.setenv("ICEFLEET_HOME", str(home))
    monkeypatch.setenv("ICEFLEET_REDIS_URL", redis_url)
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
    yield pipeline
    pipeline.close()


def icefleet(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def ok(*args: str) -> str:
    result = icefleet(*args)
    assert result.exit_code == 0, result.output
    return result.output


def ingest(
    pipe: Stack, batches: int, per_batch: int, *, commit_every: int = 2, prefix: str = "b"
) -> None:
    """Small batches over two days, group-committed ``commit_every`` at a time."""
    for n in range(batches):
        batch = f"{prefix}{n:03d}"
        pipe.write(batch, make_events(batch, per_batch, day_offset=n % 2))
        if n % commit_every == commit_every - 1:
            pipe.commit()
    pipe.commit()


def rows(table: Any) -> list[dict[str, Any]]:
    return sorted(table.scan().to_arrow().to_pylist(), key=lambda r: r["id"])


def rust_rows(table: Any) -> list[dict[str, Any]]:
    """Every row as iceberg-rust (pyiceberg-core's DataFusion provider) reads it."""
    from datafusion import SessionContext
    from pyiceberg_core.datafusion import IcebergDataFusionTable

    ctx = SessionContext()
    provider = IcebergDataFusionTable(
        identifier=list(table.name()),
        metadata_location=table.metadata_location,
        file_io_properties={},
    )
    ctx.register_table("t", provider)
    arrow: pa.Table = ctx.sql("SELECT * FROM t").to_arrow_table()
    return sorted(arrow.to_pylist(), key=lambda r: r["id"])


def test_fleet_compacted_expired_and_swept_reads_the_same_with_far_fewer_files(
    pipe: Stack,
) -> None:
    # Given 80 small batches over two days in 40 group commits, then a batch still pending
    ingest(pipe, BATCHES, PER_BATCH)
    pipe.write("pending", make_events("pending", 5))
    table = pipe.table()
    root = local_path(table.location())
    orphan = root / "data" / "time_day=2024-05-01" / "crashed-writer.parquet"
    orphan.write_bytes(b"a writer died here")
    before = rows(table)
    assert len(before) == BATCHES * PER_BATCH and rust_rows(table) == before
    small_files = [local_path(p) for p in live_data_files(table)]
    seq = committed_seq(table)
    assert (len(small_files), len(table.metadata.snapshots), seq) == (BATCHES, 40, 40)

    # When compacted, expired down to the last snapshot and swept for orphans, from the CLI
    compacted = ok("compact")
    expired = ok("expire-snapshots", TABLE, "--older-than", "0s", "--retain-last", "1")
    swept = ok("remove-orphans", TABLE, "--older-than", "0s")

    # Then two files (one per day) hold the same rows, read the same by pyiceberg and iceberg-rust
    table = pipe.table()
    assert f"{TABLE}: 80 file(s)" in compacted and "80 → 2 files" in compacted
    assert len(live_data_files(table)) == 2 and len(table.metadata.snapshots) == 1
    assert rows(table) == before
    assert rust_rows(table) == before
    # And the old files went with the expired snapshots, the orphan with the sweep
    assert "expired 40 snapshot(s)" in expired and "deleted 80 data file(s)" in expired
    assert not any(p.exists() for p in small_files)
    assert "1 orphan(s)" in swept and not orphan.exists()
    # And the pending batch's file was never touched, and still commits once
    (pending_file,) = pending_paths(pipe.registry, TABLE)
    assert local_path(pending_file).exists()
    pipe.commit()
    assert len(pipe.ids()) == BATCHES * PER_BATCH + 5
    # And the table verifies, its lineage is valid, and the watermark only moved for that commit
    table = pipe.table()
    assert "ok: 3 file(s)" in ok("verify", TABLE)
    assert validate_lineage(table) == []
    assert committed_seq(table) == seq + 1
    # And nothing is left for a second round
    assert "nothing to compact" in ok("compact", TABLE)
    assert "0 orphan(s)" in ok("remove-orphans", "--older-than", "0s")


def test_delete_removes_matching_rows_pending_ones_too(pipe: Stack) -> None:
    # Given three committed batches and a pending one
    ingest(pipe, 3, 10, commit_every=1)
    pipe.write("late", make_events("late", 10))
    # When one id of a committed batch and one of the pending batch are deleted
    output = ok("delete", TABLE, "--where", "id IN ('b001-3', 'late-7')")
    # Then both rows are gone, and nothing else
    assert f"{TABLE}: 2 row(s) deleted" in output
    ids = pipe.ids()
    assert len(ids) == 38 and "b001-3" not in ids and "late-7" not in ids
    table = pipe.table()
    assert validate_lineage(table) == [] and committed_seq(table) == 4
    # And a filter matching nothing deletes nothing
    assert "0 row(s) deleted" in ok("delete", TABLE, "--where", "id = 'nobody'")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["delete", TABLE, "--where", "no_such_column = 1"], "invalid row filter"),
        (["delete", TABLE, "--where", "id = = 1"], "invalid row filter"),
        (["compact", "events.nope"], "events.nope"),
        (["compact", "Bad Name"], "invalid identifier"),
        (["expire-snapshots", "--older-than", "soon"], "a duration such as 7d"),
    ],
)
def test_mistakes_are_one_line_errors(pipe: Stack, args: list[str], message: str) -> None:
    ingest(pipe, 1, 3)
    result = icefleet(*args)
    assert result.exit_code != 0
    assert message in result.output


def test_verify_fails_with_a_report(pipe: Stack) -> None:
    # Given a table one of whose live files was deleted behind its back
    ingest(pipe, 2, 5, commit_every=1)
    gone = sorted(live_data_files(pipe.table()))[0]
    local_path(gone).unlink()
    # When verified, then it exits 1 naming the file
    result = icefleet("verify")
    assert result.exit_code == 1
    assert "1 problem(s)" in result.output and "missing" in result.output
    assert Path(local_path(gone)).name in result.output.replace("\n", "")


def test_dry_runs_change_nothing(pipe: Stack) -> None:
    ingest(pipe, 6, 5, commit_every=1)
    before = pipe.table().metadata
    assert "would compact 6 file(s)" in ok("compact", "--dry-run", "--min-files", "2")
    assert "would expire 5 snapshot(s)" in ok(
        "expire-snapshots", "--older-than", "0s", "--retain-last", "1", "--dry-run"
    )
    assert "0 orphan(s)" in ok("remove-orphans", "--older-than", "0s", "--dry-run")
    assert pipe.table().metadata == before


def test_sync_catalog_recovers_a_lost_catalog_and_reports_a_stale_entry(pipe: Stack) -> None:
    # Given a table, and a copy of the catalog taken before its last commit
    home = pipe.settings.home
    ingest(pipe, 2, 5, commit_every=1)
    shutil.copy(home / "catalog.db", home / "old-catalog.db")
    ingest(pipe, 1, 5, commit_every=1, prefix="late")
    newest = pipe.table().metadata_location
    pipe.catalog.engine.dispose()  # type: ignore[attr-defined]

    # When the catalog is lost and sync-catalog runs
    (home / "catalog.db").unlink()
    output = ok("sync-catalog")
    # Then the table is registered at its newest metadata, every row readable
    assert f"registered {TABLE}" in output and "1 registered" in output
    catalog = open_catalog(load_settings({"ICEFLEET_HOME": str(home)}))
    table = catalog.load_table(("events", "order"))
    assert canonical_path(table.metadata_location) == canonical_path(newest)
    assert len(table.scan().to_arrow()) == 15
    # And a second run finds it in sync
    assert "0 registered, 1 in sync, 0 stale" in ok("sync-catalog")

    # When the old copy of the catalog comes back (it points at older metadata)
    catalog.engine.dispose()  # type: ignore[attr-defined]
    shutil.copy(home / "old-catalog.db", home / "catalog.db")
    output = ok("sync-catalog")
    # Then the entry is reported stale and left as it is
    assert "stale" in output and "0 registered, 0 in sync, 1 stale" in output
    catalog = open_catalog(load_settings({"ICEFLEET_HOME": str(home)}))
    assert len(catalog.load_table(("events", "order")).scan().to_arrow()) == 10


# --- the beat tasks, in process ----------------------------------------------------------------


@pytest.fixture
def eager(pipe: Stack, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Maintenance tasks run in this process; the tasks they send stay queued in Redis."""
    import workers.runtime
    from workers.app import create_app
    from workers.runtime import Runtime

    settings = load_settings(
        {},
        redis_url=pipe.settings.redis_url,
        home=pipe.settings.home,
        compact_trigger_files=6,
        compact_min_files=2,
        expire_older_than_s=0.0,
        expire_retain_last=1,
        orphan_min_age_s=0.0,
    )
    app = create_app(settings)
    monkeypatch.setattr(workers.runtime, "_runtime", Runtime(settings, redis_client))
    yield app
    app.close()


def test_beat_compacts_when_small_files_pile_up_then_expires_and_sweeps(
    pipe: Stack, eager: Any, redis_client: redis.Redis
) -> None:
    from workers.tasks.maintenance import compact_due, expire_all, remove_orphans_all

    # Given five small files: below the trigger of six
    ingest(pipe, 5, 5, commit_every=1)
    # When the compaction beat runs, then it leaves the table alone
    assert compact_due.apply().get() == []
    # Given three more, on two days
    ingest(pipe, 3, 5, commit_every=1, prefix="more")
    # When it runs again, then it compacts (one file per day)
    (result,) = compact_due.apply().get()
    assert (result["table"], result["files_before"], result["files_after"]) == (TABLE, 8, 2)
    assert len(live_data_files(pipe.table())) == 2
    # When the expiry and orphan beats run, then one snapshot remains and nothing is orphaned
    (expired,) = expire_all.apply().get()
    assert expired["retained_snapshots"] == 1 and expired["deleted_data_files"] == 8
    (swept,) = remove_orphans_all.apply().get()
    assert swept["orphans"] == 0
    assert len(pipe.ids()) == 40


def test_a_capped_compaction_hands_the_rest_to_a_follow_up_task(
    pipe: Stack, eager: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.tasks.maintenance as maintenance
    from common.maintenance.compaction_plan import CompactionOptions
    from common.maintenance.maintainer import Maintainer

    # Given small files on two days, and a cap of one day's worth per run
    ingest(pipe, 8, 5, commit_every=1)
    day_bytes = sum(f.file_size_in_bytes for f in live_data_files(pipe.table()).values()) // 2
    monkeypatch.setattr(
        Maintainer,
        "compaction_options",
        lambda self, **kw: CompactionOptions(
            64 * 1_048_576, min_files=2, max_rewrite_bytes=day_bytes + 1
        ),
    )
    # When one compaction task runs
    result = maintenance.compact_table_task.apply(args=[TABLE]).get()
    # Then it compacted one day, and queued a follow-up on the commit queue for the other
    assert result["more"] is True and result["written_files"] == 1
    queued = [orjson.loads(m)["headers"] for m in redis_client.lrange("commit", 0, -1)]
    assert [(h["task"], h["argsrepr"]) for h in queued] == [
        (maintenance.COMPACT_TABLE_TASK, f"['{TABLE}']")
    ]
    # And the follow-up finishes the job
    result = maintenance.compact_table_task.apply(args=[TABLE]).get()
    assert result["written_files"] == 1 and len(live_data_files(pipe.table())) == 2
    assert len(pipe.ids()) == 40


def test_beat_schedule_runs_maintenance_on_the_commit_queue(eager: Any) -> None:
    from workers.tasks.maintenance import COMPACT_DUE_TASK, EXPIRE_ALL_TASK, ORPHANS_ALL_TASK

    schedule = eager.conf.beat_schedule
    tasks = {entry["task"]: entry for entry in schedule.values()}
    for task in (COMPACT_DUE_TASK, EXPIRE_ALL_TASK, ORPHANS_ALL_TASK):
        assert tasks[task]["options"]["queue"] == "commit"
        assert eager.amqp.router.route({}, task)["queue"].name == "commit"
    assert tasks[EXPIRE_ALL_TASK]["schedule"] == 300.0
    assert tasks[ORPHANS_ALL_TASK]["schedule"] == 86_400.0


# --- S3 --------------------------------------------------------------------------------------


def test_maintenance_on_an_s3_warehouse(
    monkeypatch: pytest.MonkeyPatch,
    s3_endpoint: Any,
    s3_bucket: str,
    icefleet_home: Path,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    from common.maintenance.maintainer import Maintainer
    from common.maintenance.orphans import list_files
    from tests.support.catalogs import s3_backend

    # Given a table on S3 made of six small batches, and an orphan object
    s3 = s3_backend(s3_endpoint, s3_bucket, icefleet_home / "catalog.db")
    s3.apply(monkeypatch)
    pipe = make_stack(redis_url, icefleet_home, catalog=s3.catalog_name)
    try:
        ingest(pipe, 6, 5, commit_every=1)
        table = pipe.table()
        orphan = f"{table.location()}/data/orphan.parquet"
        with table.io.new_output(orphan).create() as stream:
            stream.write(b"orphan")
        before = rows(table)
        m = Maintainer(pipe.settings, pipe.catalog, redis_client)
        # When compacted, expired and swept through the FileIO
        compacted = m.compact(TABLE, m.compaction_options(min_files=2))
        from common.maintenance.expiry import ExpiryPolicy

        expired = m.expire(TABLE, ExpiryPolicy(0, 1))
        swept = m.remove_orphans(TABLE, 0)
        # Then the same rows, two files, and the bucket holds only what the metadata mentions
        table = pipe.table()
        assert (compacted.files_before, compacted.files_after) == (6, 2)
        assert expired.deleted_data_files == 6 and swept.orphans == [canonical_path(orphan)]
        assert rows(table) == before and m.verify(TABLE).ok
        listed = {f.path for f in list_files(table.io, table.location())}
        from common.maintenance.orphans import referenced_files

        assert listed <= referenced_files(table)
        assert {canonical_path(p) for p in live_data_files(table)} <= listed

        # When the table is dropped from the catalog (files kept) and the catalog synced
        pipe.catalog.drop_table(("events", "order"))
        report = m.sync_catalog()
        # Then it is registered again from the bucket
        assert report.registered == [(TABLE, canonical_path(table.metadata_location))]
        assert rows(pipe.table()) == before
    finally:
        pipe.close()
