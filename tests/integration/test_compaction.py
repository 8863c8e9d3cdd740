"""Compaction: the planner on DataFile sizes alone, and the rewrite + swap on a real table.

The table tests use the real pipeline (BatchWriter, Committer, the session's redis-server, a
SQLite catalog under tmp_path): each committed batch is one small file, as in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import redis
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.typedef import Record

from common.commit.committer import SEQ_PROPERTY, committed_seq
from common.coord.locks import TableLock
from common.errors import ConcurrentModificationError
from common.maintenance.compaction import compact_table, rewrite_plan
from common.maintenance.compaction_plan import CompactionOptions, bins, plan_compaction, plan_files
from common.maintenance.deletes import live_data_files, remove_data_files
from common.maintenance.invariants import validate_lineage
from common.maintenance.orphans import canonical_path
from common.maintenance.swap import BASE_SEQ_PROPERTY, swap_data_files
from tests.support.events import make_events
from tests.support.stack import TABLE, Stack, make_stack, outside_append

pytestmark = pytest.mark.integration

MB = 1_048_576


def data_file(
    path: str,
    size: int,
    day: int | None = 19844,
    spec_id: int = 0,
    content: DataFileContent = DataFileContent.DATA,
) -> DataFile:
    df = DataFile.from_args(
        content=content,
        file_path=path,
        file_format=FileFormat.PARQUET,
        partition=Record(day),
        record_count=size // 100,
        file_size_in_bytes=size,
    )
    df.spec_id = spec_id
    return df


# --- planner ---------------------------------------------------------------------------------


def test_planner_picks_the_three_small_files_and_not_the_large_one() -> None:
    # Given files of 1, 2, 3 and 100 MB in one partition, and a 64 MB target
    files = [data_file(f"s3://b/t/data/{n}.parquet", n * MB) for n in (1, 2, 3, 100)]
    options = CompactionOptions(target_file_size_bytes=64 * MB, min_files=3)
    # When planned
    groups = plan_files(files, options)
    # Then one group holds exactly the three small files
    assert len(groups) == 1
    assert sorted(f.file_size_in_bytes for f in groups[0].files) == [1 * MB, 2 * MB, 3 * MB]
    assert groups[0].bytes == 6 * MB


def test_planner_needs_the_minimum_count_per_partition() -> None:
    # Given two partitions: three small files in one, two in the other
    files = [data_file(f"p1-{n}", MB, day=1) for n in range(3)]
    files += [data_file(f"p2-{n}", MB, day=2) for n in range(2)]
    # When planned with a minimum of three
    groups = plan_files(files, CompactionOptions(target_file_size_bytes=64 * MB, min_files=3))
    # Then only the first partition is compacted, and files never cross partitions
    assert [g.partition for g in groups] == [Record(1)]
    assert {f.file_path for f in groups[0].files} == {"p1-0", "p1-1", "p1-2"}


def test_planner_threshold_is_the_fraction_of_the_target() -> None:
    # Given files of 40 and 50 MB at a 64 MB target
    files = [data_file(f"f{n}", size * MB) for n, size in enumerate((40, 40, 50, 50))]
    # When the fraction is 0.7 (44.8 MB), then only the 40 MB files are small
    tight = plan_files(files, CompactionOptions(64 * MB, small_file_fraction=0.7, min_files=2))
    assert [f.file_size_in_bytes for f in tight[0].files] == [40 * MB, 40 * MB]
    # When it is 1.0, then all four are
    loose = plan_files(files, CompactionOptions(64 * MB, small_file_fraction=1.0, min_files=2))
    assert len(loose[0].files) == 4


def test_planner_leaves_pending_other_specs_and_delete_files_alone() -> None:
    # Given small files, one of them pending in Redis, one of an older spec, one a delete file
    files = [data_file(f"file:///w/f{n}", MB) for n in range(4)]
    old_spec = data_file("file:///w/old", MB, spec_id=1)
    deletes = data_file("file:///w/del", MB, content=DataFileContent.POSITION_DELETES)
    # When planned on spec 0 with f0 excluded
    groups = plan_files(
        [*files, old_spec, deletes],
        CompactionOptions(64 * MB, min_files=2),
        spec_id=0,
        exclude={canonical_path("file:///w/f0")},
    )
    # Then only f1..f3 are candidates
    assert [f.file_path for f in groups[0].files] == [f"file:///w/f{n}" for n in (1, 2, 3)]


def test_bins_stay_under_the_target_and_drop_lone_files() -> None:
    # Given six 30 MB files and a 64 MB target
    files = [data_file(f"f{n}", 30 * MB) for n in range(5)]
    # When cut into bins
    cut = bins(files, 64 * MB)
    # Then pairs, and the fifth file alone is left as it is
    assert [[f.file_path for f in b] for b in cut] == [["f0", "f1"], ["f2", "f3"]]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="min_files"):
        CompactionOptions(min_files=1)
    with pytest.raises(ValueError, match="fraction"):
        CompactionOptions(small_file_fraction=0)


# --- on a real table -------------------------------------------------------------------------


@pytest.fixture
def pipe(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Stack]:
    pipeline = make_stack(redis_url, tmp_path / "home")
    yield pipeline
    pipeline.close()


def ingest(pipe: Stack, batches: int, per_batch: int, **kwargs: object) -> None:
    """``batches`` batches of ``per_batch`` events, each committed alone: one file per batch."""
    for n in range(batches):
        pipe.write(f"b{n:03d}", make_events(f"b{n:03d}", per_batch, **kwargs))  # type: ignore[arg-type]
        pipe.commit()


def rows_by_id(pipe: Stack) -> pa.Table:
    return pipe.table().scan().to_arrow().sort_by("id")


def test_ten_files_of_100_records_become_at_most_two_with_the_same_1000(pipe: Stack) -> None:
    # Given ten committed files of 100 records each
    ingest(pipe, 10, 100)
    before = rows_by_id(pipe)
    table = pipe.table()
    seq = committed_seq(table)
    assert len(live_data_files(table)) == 10
    # When compacted (a small target so that size is not what limits the output)
    lock = TableLock(pipe.client, TABLE, ttl_ms=5_000)
    result = compact_table(table, CompactionOptions(64 * MB, min_files=2), lock=lock)
    # Then at most two files hold the same 1,000 rows, every value equal
    after_table = pipe.table()
    assert 1 <= len(live_data_files(after_table)) <= 2
    assert result.rewritten_files == 10 and result.records == 1_000
    assert (result.files_before, result.files_after) == (10, len(live_data_files(after_table)))
    after = rows_by_id(pipe)
    assert after.num_rows == 1_000
    assert after.equals(before)
    # And the snapshot is a replace that kept the watermark, with a valid lineage
    snapshot = after_table.current_snapshot()
    assert snapshot is not None and snapshot.summary is not None
    assert snapshot.summary.operation.value == "replace"
    assert snapshot.summary.additional_properties[BASE_SEQ_PROPERTY] == str(seq)
    assert SEQ_PROPERTY not in snapshot.summary.additional_properties
    assert committed_seq(after_table) == seq
    assert validate_lineage(after_table) == []
    # And the output has the table's field ids and a deterministic name
    assert all("/data/time_day=2024-05-01/compacted-" in p for p in result.outputs)


def test_files_written_before_a_schema_change_are_projected(pipe: Stack) -> None:
    # Given five files without a colour column, then five with it (the schema evolved between)
    ingest(pipe, 5, 20)
    for n in range(5, 10):
        pipe.write(f"b{n:03d}", make_events(f"b{n:03d}", 20, extra={"colour": f"c{n}"}))
        pipe.commit()
    before = rows_by_id(pipe)
    # When compacted
    compact_table(pipe.table(), CompactionOptions(64 * MB, min_files=2))
    # Then the rows are the same, old ones with a null colour
    after = rows_by_id(pipe)
    assert after.equals(before)
    colours = after.column("colour").to_pylist()
    assert colours.count(None) == 100 and len(set(colours)) == 6


def test_only_one_partition_per_output(pipe: Stack) -> None:
    # Given small files on two days
    for n in range(6):
        pipe.write(f"d{n}", make_events(f"d{n}", 10, day_offset=n % 2))
        pipe.commit()
    before = rows_by_id(pipe)
    # When compacted
    result = compact_table(pipe.table(), CompactionOptions(64 * MB, min_files=2))
    # Then one output per day, rows unchanged
    assert result.groups == 2 and result.written_files == 2
    assert sorted(p.split("/")[-2] for p in result.outputs) == [
        "time_day=2024-05-01",
        "time_day=2024-05-02",
    ]
    assert rows_by_id(pipe).equals(before)


def test_an_outside_append_before_the_swap_is_kept(pipe: Stack) -> None:
    # Given a plan and its rewritten files
    ingest(pipe, 4, 10)
    table = pipe.table()
    plan = plan_compaction(table, CompactionOptions(64 * MB, min_files=2))
    inputs, outputs = rewrite_plan(table, plan, row_group_rows=1_000)
    # When another tool appends before the swap commits (the swap's base is now stale)
    outside_append(pipe.catalog, TABLE, ["outside-1"])
    swap_data_files(table, inputs, outputs)
    # Then the appended row is still there, and the small files are gone
    ids = pipe.ids()
    assert "outside-1" in ids and len(ids) == 41
    assert len(live_data_files(pipe.table())) == 2  # the output and the outside file


def test_an_input_removed_meanwhile_fails_the_swap(pipe: Stack) -> None:
    # Given rewritten files for a plan
    ingest(pipe, 4, 10)
    table = pipe.table()
    plan = plan_compaction(table, CompactionOptions(64 * MB, min_files=2))
    inputs, outputs = rewrite_plan(table, plan, row_group_rows=1_000)
    # When one input is removed by a racing delete before the swap
    remove_data_files(pipe.table(), [inputs[0].file_path])
    # Then the swap refuses, and nothing was committed
    snapshots = len(pipe.table().metadata.snapshots)
    with pytest.raises(ConcurrentModificationError) as raised:
        swap_data_files(table, inputs, outputs)
    assert raised.value.paths == [inputs[0].file_path]
    assert len(pipe.table().metadata.snapshots) == snapshots


def test_compact_table_plans_again_after_a_race(
    pipe: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a table whose first compaction attempt loses a file to a racing delete
    ingest(pipe, 4, 10)
    import common.maintenance.compaction as compaction

    real = compaction.swap_data_files
    raced: list[str] = []

    def racing_swap(table, old, new, **kwargs):  # type: ignore[no-untyped-def]
        if not raced:
            raced.append(old[0].file_path)
            remove_data_files(pipe.table(), [old[0].file_path])
        return real(table, old, new, **kwargs)

    monkeypatch.setattr(compaction, "swap_data_files", racing_swap)
    # When compacted
    result = compact_table(pipe.table(), CompactionOptions(64 * MB, min_files=2))
    # Then the second attempt compacts the three files left, and the lost attempt's output is gone
    assert result.attempts == 2 and result.rewritten_files == 3
    assert len(pipe.ids()) == 30
    assert len(live_data_files(pipe.table())) == 1


def test_nothing_to_compact_changes_nothing(pipe: Stack) -> None:
    # Given two files only
    ingest(pipe, 2, 10)
    snapshots = len(pipe.table().metadata.snapshots)
    # When compacted with a minimum of five
    result = compact_table(pipe.table(), CompactionOptions(64 * MB, min_files=5))
    # Then no snapshot is made
    assert result.rewritten_files == 0 and result.files_after == 2
    assert len(pipe.table().metadata.snapshots) == snapshots


def test_outputs_are_deleted_when_the_lock_cannot_be_had(pipe: Stack) -> None:
    from common.errors import LockNotAcquiredError
    from tests.support.readback import local_path

    # Given three small files, and the table lock held by someone else
    ingest(pipe, 3, 10)
    held = TableLock(pipe.client, TABLE, ttl_ms=5_000).acquire()
    try:
        # When a compaction cannot take the lock for its swap
        with pytest.raises(LockNotAcquiredError):
            compact_table(
                pipe.table(),
                CompactionOptions(64 * MB, min_files=2),
                lock=TableLock(pipe.client, TABLE, ttl_ms=5_000, wait_s=0.2),
            )
    finally:
        held.release()
    # Then nothing changed and its rewritten file is gone
    root = local_path(pipe.table().location())
    assert list(root.rglob("compacted-*")) == []
    assert len(live_data_files(pipe.table())) == 3
