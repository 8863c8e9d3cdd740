"""``verify``: every live file exists with the manifest's size and its footer's row count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from pyiceberg.manifest import DataFile

from common.commit.committer import without_library_retries
from common.maintenance.deletes import live_data_files
from common.maintenance.verify import verify_table
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.stack import Stack, make_stack

pytestmark = pytest.mark.integration


@pytest.fixture
def pipe(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Stack]:
    pipeline = make_stack(redis_url, tmp_path / "home")
    for n in range(3):
        pipeline.write(f"b{n}", make_events(f"b{n}", 4))
        pipeline.commit()
    yield pipeline
    pipeline.close()


def files(pipe: Stack) -> list[DataFile]:
    return sorted(live_data_files(pipe.table()).values(), key=lambda f: f.file_path)


def test_a_healthy_table_verifies(pipe: Stack) -> None:
    report = verify_table(pipe.table())
    assert report.ok and report.problems == []
    assert (report.files, report.records) == (3, 12)


def test_a_missing_file_is_reported(pipe: Stack) -> None:
    # Given a live file deleted behind the table's back
    gone = files(pipe)[0]
    local_path(gone.file_path).unlink()
    # When verified
    report = verify_table(pipe.table())
    # Then the report names it
    assert not report.ok
    assert report.problems == [
        f"{gone.file_path}: missing (the manifest says {gone.file_size_in_bytes} bytes)"
    ]


def test_a_file_of_the_wrong_size_is_reported(pipe: Stack) -> None:
    # Given a live file truncated
    broken = files(pipe)[1]
    path = local_path(broken.file_path)
    path.write_bytes(path.read_bytes()[:-10])
    # When verified, then its size is the problem
    (problem,) = verify_table(pipe.table()).problems
    assert f"{broken.file_size_in_bytes - 10} bytes, the manifest says" in problem


def test_a_footer_that_disagrees_with_the_manifest_is_reported(pipe: Stack) -> None:
    # Given a manifest entry whose record count is not the file's (another tool's bug)
    table = pipe.table()
    source = files(pipe)[0]
    liar = DataFile.from_args(
        content=source.content,
        file_path=source.file_path.replace(".parquet", "-copy.parquet"),
        file_format=source.file_format,
        partition=source.partition,
        record_count=source.record_count + 1,
        file_size_in_bytes=source.file_size_in_bytes,
    )
    liar.spec_id = source.spec_id
    local_path(liar.file_path).write_bytes(local_path(source.file_path).read_bytes())
    tx = without_library_retries(table).transaction()
    with tx.update_snapshot().fast_append() as append:
        append.append_data_file(liar)
    tx.commit_transaction()
    # When verified, then the footer disagreement is reported
    (problem,) = verify_table(pipe.table()).problems
    assert problem == (
        f"{liar.file_path}: the footer says {source.record_count} rows, "
        f"the manifest says {source.record_count + 1}"
    )


def test_a_corrupt_footer_is_reported(pipe: Stack) -> None:
    # Given a live file overwritten with garbage of the same size
    broken = files(pipe)[2]
    path = local_path(broken.file_path)
    path.write_bytes(b"x" * broken.file_size_in_bytes)
    # When verified, then the footer is reported unreadable
    (problem,) = verify_table(pipe.table()).problems
    assert problem.startswith(f"{broken.file_path}: unreadable Parquet footer")


def test_an_empty_table_verifies(tmp_path: Path) -> None:
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog(
        "v", type="sql", uri=f"sqlite:///{tmp_path}/c.db", warehouse=tmp_path.as_uri()
    )
    catalog.create_namespace("n")
    table = catalog.create_table(("n", "t"), schema=pa.schema([("a", pa.int64())]))
    assert verify_table(table).ok
    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")  # unrelated files don't matter
    assert verify_table(table).ok


# --- deep ----------------------------------------------------------------------------------------


def commit_copy(pipe: Stack, source: DataFile, **claims: object) -> DataFile:
    """A copy of ``source``'s bytes committed with a manifest entry claiming ``claims``."""
    fields = {
        name: getattr(source, name)
        for name in (
            "content",
            "file_format",
            "partition",
            "record_count",
            "file_size_in_bytes",
            "value_counts",
            "null_value_counts",
            "nan_value_counts",
            "lower_bounds",
            "upper_bounds",
        )
    }
    copy = DataFile.from_args(
        file_path=source.file_path.replace(".parquet", "-copy.parquet"), **{**fields, **claims}
    )
    copy.spec_id = source.spec_id
    local_path(copy.file_path).write_bytes(local_path(source.file_path).read_bytes())
    tx = without_library_retries(pipe.table()).transaction()
    with tx.update_snapshot().fast_append() as append:
        append.append_data_file(copy)
    tx.commit_transaction()
    return copy


def test_a_healthy_table_verifies_deeply_with_progress(pipe: Stack) -> None:
    seen: list[int] = []
    report = verify_table(pipe.table(), deep=True, progress=seen.append)
    assert report.ok and report.deep and report.notes == []
    assert (report.checked, seen) == (3, [3, 1, 1, 1])
    assert report.to_dict()["ok"] is True


def test_deep_verify_finds_statistics_that_would_hide_rows(pipe: Stack) -> None:
    # Given a file whose manifest entry claims tighter bounds and other counts than its rows
    from pyiceberg.conversions import to_bytes
    from pyiceberg.types import StringType

    source = files(pipe)[0]
    id_field = pipe.table().schema().find_field("id").field_id
    lower = dict(source.lower_bounds)
    lower[id_field] = to_bytes(StringType(), "zz")
    upper = dict(source.upper_bounds)
    upper[id_field] = to_bytes(StringType(), "a")
    nulls = {**source.null_value_counts, id_field: 3}
    liar = commit_copy(
        pipe, source, lower_bounds=lower, upper_bounds=upper, null_value_counts=nulls
    )
    # When verified deeply
    report = verify_table(pipe.table(), deep=True)
    # Then each lie is named with the file; the shallow check had nothing to say
    assert verify_table(pipe.table()).ok
    assert report.bad_files == [liar.file_path]
    assert report.problems == [
        f"{liar.file_path}: column id: null count 3 in the manifest, 0 in the data",
        f"{liar.file_path}: column id: the manifest's lower bound 'zz' is above the data's "
        "minimum 'b0-0'",
        f"{liar.file_path}: column id: the manifest's upper bound 'a' is below the data's "
        "maximum 'b0-3'",
    ]


def test_deep_verify_counts_the_rows_it_reads(pipe: Stack) -> None:
    source = files(pipe)[1]
    liar = commit_copy(pipe, source, record_count=source.record_count + 2)
    problems = verify_table(pipe.table(), deep=True).problems
    assert problems == [
        f"{liar.file_path}: the footer says {source.record_count} rows, "
        f"the manifest says {source.record_count + 2}"
    ]


def test_deep_verify_notes_files_without_page_checksums(pipe: Stack) -> None:
    # Given a live file rewritten, same rows, without page checksums (as before icefleet wrote them)
    source = files(pipe)[2]
    path = local_path(source.file_path)
    rows = pq.read_table(path)
    pq.write_table(rows, path, compression="zstd", use_dictionary=False, write_page_checksum=False)
    size = path.stat().st_size
    liar = commit_copy(pipe, source, file_size_in_bytes=size)
    # When verified deeply, then it passes with a note saying what cannot be found in it
    report = verify_table(pipe.table(), deep=True, only={liar.file_path})
    assert report.checked == 1
    assert report.notes == [
        f"{liar.file_path}: written without page checksums (a changed byte is found only if "
        "it does not decode)"
    ]


def test_deep_verify_reports_a_file_it_cannot_read(pipe: Stack) -> None:
    broken = files(pipe)[0]
    path = local_path(broken.file_path)
    path.write_bytes(b"x" * broken.file_size_in_bytes)
    (problem,) = verify_table(pipe.table(), deep=True).problems
    assert problem.startswith(f"{broken.file_path}: unreadable Parquet footer")
