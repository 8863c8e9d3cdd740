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
