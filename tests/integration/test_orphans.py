"""Orphan files: planted ones are removed, while live, pending and young files stay."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from common.maintenance.orphans import (
    canonical_path,
    list_files,
    pending_paths,
    referenced_files,
    remove_orphans,
)
from common.maintenance.verify import verify_table
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.stack import TABLE, Stack, make_stack

pytestmark = pytest.mark.integration

DAYS_S = 86_400


@pytest.fixture
def pipe(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Stack]:
    pipeline = make_stack(redis_url, tmp_path / "home")
    yield pipeline
    pipeline.close()


def plant(path: Path, age_s: float, content: bytes = b"orphan") -> Path:
    """A file at ``path`` whose modification time is ``age_s`` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def age_everything(root: Path, age_s: float) -> None:
    then = time.time() - age_s
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


def test_planted_orphans_are_removed_while_live_and_pending_files_stay(pipe: Stack) -> None:
    # Given a table with committed files, and a pending batch written but not committed
    for n in range(3):
        pipe.write(f"b{n}", make_events(f"b{n}", 5))
        pipe.commit()
    pipe.write("pending", make_events("pending", 5))
    table = pipe.table()
    root = local_path(table.location())
    age_everything(root, 10 * DAYS_S)  # everything old enough: only references protect
    # And orphans planted: a data file, a manifest and a metadata file nothing references
    orphans = [
        plant(root / "data/time_day=2024-05-01/crashed-writer.parquet", 5 * DAYS_S),
        plant(root / "metadata/snap-1-0-lost.avro", 5 * DAYS_S),
        plant(root / "metadata/99999-lost.metadata.json", 5 * DAYS_S),
    ]
    young = plant(root / "data/time_day=2024-05-01/just-written.parquet", 60)
    pending = pending_paths(pipe.registry, TABLE)
    assert len(pending) == 1
    ids = sorted(pipe.ids())
    # When orphans older than 3 days are removed
    report = remove_orphans(table, registry=pipe.registry, min_age_s=3 * DAYS_S)
    # Then exactly the planted ones are gone
    assert sorted(report.orphans) == sorted(canonical_path(str(p)) for p in orphans)
    assert report.deleted == 3 and not any(p.exists() for p in orphans)
    # And the young file, the pending file and every referenced file stay
    assert young.exists() and report.too_young == 1
    assert report.pending == 1 and all(local_path(p).exists() for p in pending)
    table = pipe.table()
    assert all(local_path(p).exists() for p in referenced_files(table))
    assert sorted(pipe.ids()) == ids and verify_table(table).ok
    # And the pending batch still commits
    pipe.commit()
    assert len(pipe.ids()) == 20


def test_dry_run_reports_without_deleting(pipe: Stack) -> None:
    # Given an old orphan
    pipe.write("b0", make_events("b0", 5))
    pipe.commit()
    root = local_path(pipe.table().location())
    orphan = plant(root / "data/orphan.parquet", 5 * DAYS_S)
    # When a dry run looks for orphans
    report = remove_orphans(pipe.table(), registry=None, min_age_s=0, dry_run=True)
    # Then it names the orphan and deletes nothing
    assert report.orphans == [canonical_path(str(orphan))] and report.deleted == 0
    assert orphan.exists()


def test_min_age_zero_removes_a_fresh_orphan(pipe: Stack) -> None:
    pipe.write("b0", make_events("b0", 5))
    pipe.commit()
    root = local_path(pipe.table().location())
    orphan = plant(root / "data/fresh.parquet", 0)
    report = remove_orphans(pipe.table(), registry=pipe.registry, min_age_s=0)
    assert report.deleted == 1 and not orphan.exists()
    assert len(pipe.ids()) == 5


def test_listing_finds_files_with_size_and_age(tmp_path: Path) -> None:
    # Given files in nested folders
    from pyiceberg.io.pyarrow import PyArrowFileIO

    plant(tmp_path / "a/b/c.txt", 100, b"12345")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "a/d.parquet")
    # When listed through a FileIO
    listed = {f.path: f for f in list_files(PyArrowFileIO(), tmp_path.as_uri())}
    # Then both are there with canonical paths, sizes and times
    c = listed[canonical_path(str(tmp_path / "a/b/c.txt"))]
    assert c.size == 5 and abs(c.modified_ms / 1000 - (time.time() - 100)) < 5
    assert canonical_path(str(tmp_path / "a/d.parquet")) in listed
    # And a location that does not exist lists nothing
    assert list_files(PyArrowFileIO(), (tmp_path / "nope").as_uri()) == []


def test_canonical_paths() -> None:
    assert canonical_path("s3a://bucket/key") == "s3://bucket/key"
    assert canonical_path("s3://bucket/key") == "s3://bucket/key"
    assert canonical_path("/tmp/x") == "file:///tmp/x"
    assert canonical_path("file:///tmp/x") == "file:///tmp/x"


def test_refuses_when_no_data_file_matches_the_listing(
    pipe: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.maintenance.orphans as orphans
    from common.errors import StorageError

    # Given a listing whose paths are spelt differently from the table's references
    pipe.write("b0", make_events("b0", 5))
    pipe.commit()
    real = orphans.list_files

    def elsewhere(io: object, location: str) -> list[orphans.ListedFile]:
        return [
            orphans.ListedFile(f.path.replace("/data/", "/DATA/"), f.size, 0)
            for f in real(io, location)  # type: ignore[arg-type]
        ]

    monkeypatch.setattr(orphans, "list_files", elsewhere)
    # When orphans are removed, then it refuses instead of deleting the table's data
    with pytest.raises(StorageError, match="refusing"):
        remove_orphans(pipe.table(), registry=pipe.registry, min_age_s=0)
    assert len(pipe.ids()) == 5
