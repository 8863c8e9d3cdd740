"""Snapshot expiry by policy, and the deletion of the files only expired snapshots referenced.

Snapshots "one day apart" are made for real, with pyiceberg's snapshot clock set back: the
``time`` module pyiceberg's Snapshot reads its default timestamp from is replaced for the test.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from pyiceberg.table.snapshots import Snapshot

from common.commit.committer import committed_seq
from common.coord.locks import TableLock
from common.maintenance.compaction import compact_table
from common.maintenance.compaction_plan import CompactionOptions
from common.maintenance.deletes import live_data_files
from common.maintenance.expiry import ExpiryPolicy, expire_snapshots, snapshots_to_expire
from common.maintenance.invariants import validate_lineage
from common.maintenance.orphans import canonical_path, reachable_files
from common.maintenance.verify import verify_table
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.stack import TABLE, Stack, make_stack

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


class Clock:
    """The clock pyiceberg stamps new snapshots with."""

    def __init__(self) -> None:
        self.now_ms = int(time.time() * 1000)

    def time(self) -> float:
        return self.now_ms / 1000


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    import pyiceberg.table.snapshots as snapshots

    fake = Clock()
    monkeypatch.setattr(snapshots, "time", SimpleNamespace(time=fake.time))
    return fake


@pytest.fixture
def pipe(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Stack]:
    pipeline = make_stack(redis_url, tmp_path / "home")
    yield pipeline
    pipeline.close()


def commit_days(pipe: Stack, clock: Clock, days_ago: list[float], prefix: str = "b") -> None:
    """One committed batch (one file) per entry, stamped that many days before now."""
    now = int(time.time() * 1000)
    for n, days in enumerate(days_ago):
        clock.now_ms = now - int(days * DAY_MS)
        pipe.write(f"{prefix}{n}", make_events(f"{prefix}{n}", 5))
        pipe.commit()


def test_seven_day_policy_expires_the_snapshots_older_than_seven_days(
    pipe: Stack, clock: Clock
) -> None:
    # Given ten snapshots one day apart, the newest an hour old
    commit_days(pipe, clock, [9 + 1 / 24 - n for n in range(10)])
    table = pipe.table()
    stamps = sorted(s.timestamp_ms for s in table.metadata.snapshots)
    assert [round((b - a) / DAY_MS) for a, b in itertools.pairwise(stamps)] == [1] * 9
    old_lists = {canonical_path(s.manifest_list) for s in table.metadata.snapshots}
    # When snapshots older than 7 days are expired
    lock = TableLock(pipe.client, TABLE, ttl_ms=5_000)
    report = expire_snapshots(table, ExpiryPolicy(7 * 86_400, retain_last=1), lock=lock)
    # Then the three older than 7 days are gone, the seven others kept
    table = pipe.table()
    kept = sorted(s.timestamp_ms for s in table.metadata.snapshots)
    assert len(report.expired_snapshot_ids) == 3 and kept == stamps[3:]
    # And their manifest lists deleted, while every row and data file stays (fast appends)
    assert report.deleted_manifest_lists == 3 and report.deleted_data_files == 0
    gone = old_lists - {canonical_path(s.manifest_list) for s in table.metadata.snapshots}
    assert len(gone) == 3 and not any(local_path(p).exists() for p in gone)
    assert len(pipe.ids()) == 50
    assert verify_table(table).ok and validate_lineage(table) == []
    assert committed_seq(table) == 10


def test_retain_last_keeps_the_newest_whatever_their_age(pipe: Stack, clock: Clock) -> None:
    # Given five snapshots all older than a week
    commit_days(pipe, clock, [30, 20, 15, 10, 8])
    # When expired with a 7-day policy that retains the last 3
    report = expire_snapshots(pipe.table(), ExpiryPolicy(7 * 86_400, retain_last=3))
    # Then two are expired and three kept
    assert len(report.expired_snapshot_ids) == 2
    assert len(pipe.table().metadata.snapshots) == 3


def test_the_current_snapshot_is_never_expired(pipe: Stack) -> None:
    # Given one snapshot
    pipe.write("b0", make_events("b0", 3))
    pipe.commit()
    table = pipe.table()
    # When everything older than now is expired, retaining one
    assert snapshots_to_expire(table.metadata, ExpiryPolicy(0, 1), now_ms=2**62) == []
    # Then even a policy asked to keep only 1 keeps the current
    report = expire_snapshots(table, ExpiryPolicy(0, 1), now_ms=2**62)
    assert report.expired_snapshot_ids == [] and len(pipe.table().metadata.snapshots) == 1


def test_files_replaced_by_compaction_go_with_the_snapshots_that_read_them(
    pipe: Stack, clock: Clock
) -> None:
    # Given six small files committed days ago, then compacted, then one more commit
    commit_days(pipe, clock, [6, 5, 4, 3, 2, 1])
    small = [canonical_path(p) for p in live_data_files(pipe.table())]
    clock.now_ms = int(time.time() * 1000) - HOUR_MS
    compact_table(pipe.table(), CompactionOptions(64 * 1_048_576, min_files=2))
    clock.now_ms = int(time.time() * 1000)
    pipe.write("late", make_events("late", 5))
    pipe.commit()
    ids = sorted(pipe.ids())
    # When everything but the last snapshot is expired
    report = expire_snapshots(pipe.table(), ExpiryPolicy(0, retain_last=1))
    # Then the six small files are deleted (only expired snapshots could read them)
    assert report.deleted_data_files == 6
    assert not any(local_path(p).exists() for p in small)
    # And what remains reads the same rows, and verifies
    table = pipe.table()
    assert len(table.metadata.snapshots) == 1
    assert sorted(pipe.ids()) == ids
    assert verify_table(table).ok
    # And nothing still referenced was deleted
    alive = reachable_files(table.io, table.metadata.snapshots)
    assert all(local_path(p).exists() for p in alive.all())


def test_pending_files_are_never_deleted(pipe: Stack, clock: Clock) -> None:
    # Given compacted files, one of whose inputs is (wrongly) still registered as pending
    commit_days(pipe, clock, [3, 2, 1])
    first = sorted(live_data_files(pipe.table()).values(), key=lambda f: f.file_path)[0]
    compact_table(pipe.table(), CompactionOptions(64 * 1_048_576, min_files=2))
    from common.coord.pending import PendingEntry

    pipe.registry.register(TABLE, "stuck", PendingEntry.of("stuck", [first]).to_json())
    # When every old snapshot is expired
    report = expire_snapshots(pipe.table(), ExpiryPolicy(0, 1), registry=pipe.registry)
    # Then the pending file stays, the others go
    assert report.kept_pending == 1 and report.deleted_data_files == 2
    assert local_path(first.file_path).exists()


def test_dry_run_changes_nothing(pipe: Stack, clock: Clock) -> None:
    # Given three old snapshots
    commit_days(pipe, clock, [3, 2, 1])
    before = pipe.table().metadata
    # When a dry run expires all but one
    report = expire_snapshots(pipe.table(), ExpiryPolicy(0, 1), dry_run=True)
    # Then it reports two snapshots and their manifest lists, and changes nothing
    assert len(report.expired_snapshot_ids) == 2 and report.deleted_manifest_lists == 2
    after = pipe.table().metadata
    assert after.snapshots == before.snapshots
    assert all(local_path(s.manifest_list).exists() for s in after.snapshots)


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="retain_last"):
        ExpiryPolicy(0, retain_last=0)
    with pytest.raises(ValueError, match="negative"):
        ExpiryPolicy(-1)


def test_snapshots_to_expire_orders_oldest_first(pipe: Stack, clock: Clock) -> None:
    commit_days(pipe, clock, [4, 3, 2, 1])
    chosen: list[Snapshot] = snapshots_to_expire(pipe.table().metadata, ExpiryPolicy(0, 2))
    assert [s.timestamp_ms for s in chosen] == sorted(s.timestamp_ms for s in chosen)
    assert len(chosen) == 2
