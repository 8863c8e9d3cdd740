"""Snapshot expiry by policy, and deleting the files only expired snapshots referenced.

pyiceberg's ``table.maintenance.expire_snapshots()`` removes snapshots from the metadata and
nothing else; the files are ours to delete (design.md §8). :func:`expire_snapshots`:

1. under the table lock, picks the snapshots to expire: older than ``older_than_s`` and not among
   the newest ``retain_last``; never the current snapshot nor any branch or tag head;
2. commits their removal (pyiceberg's expiry, its own commit retry off);
3. deletes what only they referenced, computed on the metadata that was committed: manifest lists,
   manifests and data files that no retained snapshot reaches, and metadata JSON files that left the metadata log with
   this commit. A pending file is never deleted, whatever the metadata says.

"Reaches" means can read: a data file that a retained snapshot's manifest lists as *deleted* (the
compaction or delete that removed it is retained, the snapshots that read it are not) goes.

Older metadata files that left the log before (tables written by tools that do not prune) are
orphans: :func:`common.maintenance.orphans.remove_orphans` finds them.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.table.snapshots import Snapshot

from common.commit.committer import without_library_retries
from common.coord.pending import PendingRegistry
from common.errors import RetriesExhaustedError
from common.maintenance.orphans import (
    Reachable,
    canonical_path,
    delete_files,
    metadata_files,
    pending_paths,
    reachable_files,
)

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 4


@dataclass(frozen=True)
class ExpiryPolicy:
    """Expire snapshots older than ``older_than_s``, but keep the newest ``retain_last``."""

    older_than_s: float
    retain_last: int = 1

    def __post_init__(self) -> None:
        if self.older_than_s < 0:
            raise ValueError(f"older_than_s cannot be negative, got {self.older_than_s}")
        if self.retain_last < 1:
            raise ValueError(f"retain_last must be at least 1, got {self.retain_last}")


@dataclass
class ExpiryReport:
    """What :func:`expire_snapshots` did to one table."""

    table: str
    expired_snapshot_ids: list[int] = field(default_factory=list)
    retained_snapshots: int = 0
    deleted_data_files: int = 0
    deleted_manifests: int = 0
    deleted_manifest_lists: int = 0
    deleted_metadata_files: int = 0
    kept_pending: int = 0
    dry_run: bool = False

    @property
    def deleted_files(self) -> int:
        return (
            self.deleted_data_files
            + self.deleted_manifests
            + self.deleted_manifest_lists
            + self.deleted_metadata_files
        )


def protected_snapshot_ids(metadata: TableMetadata) -> set[int]:
    """The current snapshot and the heads of every branch and tag."""
    ids = {
        ref.snapshot_id
        for ref in metadata.refs.values()
        if ref.snapshot_ref_type in (SnapshotRefType.BRANCH, SnapshotRefType.TAG)
    }
    if metadata.current_snapshot_id is not None:
        ids.add(metadata.current_snapshot_id)
    return ids


def snapshots_to_expire(
    metadata: TableMetadata, policy: ExpiryPolicy, now_ms: int | None = None
) -> list[Snapshot]:
    """The snapshots ``policy`` expires, oldest first."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff_ms = now_ms - int(policy.older_than_s * 1000)
    newest_first = sorted(
        metadata.snapshots,
        key=lambda s: (s.timestamp_ms, s.sequence_number or 0),
        reverse=True,
    )
    protected = protected_snapshot_ids(metadata)
    chosen = [
        s
        for s in newest_first[policy.retain_last :]
        if s.timestamp_ms < cutoff_ms and s.snapshot_id not in protected
    ]
    return chosen[::-1]


def expire_snapshots(
    table: Table,
    policy: ExpiryPolicy,
    *,
    lock: AbstractContextManager[object] | None = None,
    registry: PendingRegistry | None = None,
    dry_run: bool = False,
    now_ms: int | None = None,
) -> ExpiryReport:
    """Expire ``table``'s snapshots by ``policy`` and delete the files only they referenced.

    ``lock`` (a :class:`~common.coord.locks.TableLock`, not yet acquired) is held from choosing the
    snapshots until the metadata commit. With ``dry_run`` nothing is committed or deleted; the
    report says what would be.
    """
    name = ".".join(table.name())
    report = ExpiryReport(name, dry_run=dry_run)
    with lock if lock is not None else nullcontext():
        table = table.refresh()
        before = table.metadata
        before_location = table.metadata_location
        expired = snapshots_to_expire(before, policy, now_ms)
        if not expired:
            report.retained_snapshots = len(before.snapshots)
            return report
        ids = [s.snapshot_id for s in expired]
        if dry_run:
            after, after_location = _without(before, set(ids)), before_location
        else:
            committed, ids = _commit_expiry(table, ids)
            expired = [s for s in expired if s.snapshot_id in set(ids)]
            after, after_location = committed.metadata, committed.metadata_location
    report.expired_snapshot_ids = ids
    report.retained_snapshots = len(after.snapshots)
    _delete_unreachable(
        table, expired, before, before_location, after, after_location, registry, report
    )
    logger.info(
        "%s: %s %d snapshot(s) (%d retained); %d data file(s), %d manifest(s), %d manifest "
        "list(s), %d metadata file(s) %s",
        name,
        "would expire" if dry_run else "expired",
        len(ids),
        report.retained_snapshots,
        report.deleted_data_files,
        report.deleted_manifests,
        report.deleted_manifest_lists,
        report.deleted_metadata_files,
        "to delete" if dry_run else "deleted",
    )
    return report


def _commit_expiry(table: Table, ids: list[int]) -> tuple[Table, list[int]]:
    """Remove the snapshots ``ids`` from the metadata; the table as committed, and the ids
    removed (fewer when an outside writer changed the table meanwhile).

    The removal carries no requirement on the base snapshot (removing old snapshots is valid on
    top of any newer commit), so a conflict with an outside writer is simply tried again.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        committed = without_library_retries(table)
        try:
            committed.maintenance.expire_snapshots().by_ids(ids).commit()
            return committed, ids
        except CommitFailedException as exc:
            if attempt == COMMIT_ATTEMPTS:
                raise RetriesExhaustedError(
                    f"expiry of {len(ids)} snapshot(s) of {'.'.join(table.name())}", attempt, exc
                ) from exc
            logger.info("expiry commit conflicted (attempt %d): %s", attempt, exc)
            table = table.refresh()
            ids = [i for i in ids if table.metadata.snapshot_by_id(i) is not None]
            ids = [i for i in ids if i not in protected_snapshot_ids(table.metadata)]
            if not ids:
                return table, ids
    raise AssertionError("unreachable")  # pragma: no cover


def _without(metadata: TableMetadata, ids: set[int]) -> TableMetadata:
    kept = [s for s in metadata.snapshots if s.snapshot_id not in ids]
    return metadata.model_copy(update={"snapshots": kept})


def _delete_unreachable(
    table: Table,
    expired: list[Snapshot],
    before: TableMetadata,
    before_location: str,
    after: TableMetadata,
    after_location: str,
    registry: PendingRegistry | None,
    report: ExpiryReport,
) -> None:
    io = table.io
    retained: Reachable = reachable_files(io, after.snapshots, live_only=True)
    # Open only the manifests no retained snapshot has: the files only they mention are the
    # candidates (a manifest that is still retained mentions nothing new to delete).
    candidates = reachable_files(io, expired, skip_manifests=retained.manifests)
    protected = pending_paths(registry, report.table)
    lists = candidates.manifest_lists - retained.manifest_lists
    manifests = candidates.manifests - retained.manifests
    data = candidates.content_files - retained.content_files
    report.kept_pending = len(data & protected)
    data -= protected
    metadata = metadata_files(before, before_location) - metadata_files(after, after_location)
    metadata.discard(canonical_path(after_location))
    if report.dry_run:
        counts = (len(data), len(manifests), len(lists), len(metadata))
    else:
        counts = (
            delete_files(io, data),
            delete_files(io, manifests),
            delete_files(io, lists),
            delete_files(io, metadata),
        )
    (
        report.deleted_data_files,
        report.deleted_manifests,
        report.deleted_manifest_lists,
        report.deleted_metadata_files,
    ) = counts


def cutoff_datetime(policy: ExpiryPolicy, now_ms: int | None = None) -> datetime:
    """The moment before which snapshots are old enough to expire, for messages."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return datetime.fromtimestamp((now_ms - policy.older_than_s * 1000) / 1000, UTC)


__all__ = [
    "ExpiryPolicy",
    "ExpiryReport",
    "cutoff_datetime",
    "expire_snapshots",
    "protected_snapshot_ids",
    "snapshots_to_expire",
]
