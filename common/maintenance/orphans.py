"""What a table references, what its location holds, and removing the difference (orphan files).

An *orphan* is a file under a table's location that no metadata references: a data file whose
commit failed, a compaction output whose swap never landed, manifests and metadata files of failed
commits. :func:`remove_orphans` deletes the ones older than a minimum age (default 3 days), and
never a file that is *pending* in Redis (written and registered, not committed yet) or part of a
prepared commit (whose batches are still in the pending registry until the commit finishes).

Why no table lock: the steps run in an order that makes it unnecessary. The location is listed
first, then the pending registry is read, then the table is refreshed. A file listed before a
commit landed is either still pending when the registry is read, or its commit is visible in the
metadata read after it (the committer clears pending only after its commit landed). What no order
can protect is a file written and not yet registered (or committed by an outside writer after the
refresh): the minimum age is there for those, so keep it well above the longest write.

Listing goes through the table's :class:`~pyiceberg.io.pyarrow.PyArrowFileIO` filesystem, so it
works for ``file://`` and ``s3://`` warehouses alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote

import orjson
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.manifest import ManifestFile
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot

from common.coord.pending import PendingRegistry
from common.errors import StorageError

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"  # common/maintenance/quarantine.py keeps bad files there
IO_THREADS = 16  # listing and deleting on object storage is latency-bound
_SCHEMES = {"s3a": "s3", "s3n": "s3", "": "file", "gcs": "gs"}


# --- paths and listing ---------------------------------------------------------------------------


def canonical_path(location: str) -> str:
    """One spelling per file: ``file:///abs/path``, ``s3://bucket/key`` (s3a/s3n → s3)."""
    scheme, _netloc, path = PyArrowFileIO.parse_location(location)
    scheme = _SCHEMES.get(scheme, scheme)
    if scheme == "file":
        return "file://" + path
    return f"{scheme}://{path.lstrip('/')}"


@dataclass(frozen=True)
class ListedFile:
    """A file found under a location: canonical path, size and modification time."""

    path: str
    size: int
    modified_ms: int
    is_dir: bool = False


def list_files(
    io: FileIO, location: str, *, recursive: bool = True, directories: bool = False
) -> list[ListedFile]:
    """The files under ``location`` (all levels, or one with ``recursive=False``; directories
    too with ``directories=True``, size 0), through the FileIO's pyarrow filesystem."""
    from pyarrow import fs as pafs

    if not isinstance(io, PyArrowFileIO):
        raise StorageError(
            f"listing {location} needs pyiceberg's PyArrowFileIO (the default py-io-impl), "
            f"not {type(io).__name__}"
        )
    scheme, netloc, path = PyArrowFileIO.parse_location(location, io.properties)
    filesystem = io.fs_by_scheme(scheme, netloc)
    selector = pafs.FileSelector(path.rstrip("/"), recursive=recursive, allow_not_found=True)
    canonical_scheme = _SCHEMES.get(scheme, scheme)
    prefix = "file://" if canonical_scheme == "file" else f"{canonical_scheme}://"
    kinds = {pafs.FileType.File, pafs.FileType.Directory} if directories else {pafs.FileType.File}
    files = []
    for info in filesystem.get_file_info(selector):
        if info.type not in kinds:
            continue
        mtime = info.mtime
        modified_ms = int(mtime.timestamp() * 1000) if mtime is not None else 0
        is_dir = info.type == pafs.FileType.Directory
        size = 0 if is_dir else int(info.size or 0)
        files.append(ListedFile(canonical_path(prefix + info.path), size, modified_ms, is_dir))
    return files


def delete_files(io: FileIO, paths: Collection[str]) -> int:
    """Delete ``paths`` (in parallel); return how many were deleted. Missing ones are skipped."""

    def delete(path: str) -> bool:
        try:
            io.delete(path)
        except FileNotFoundError:
            return False
        return True

    if not paths:
        return 0
    with ThreadPoolExecutor(min(IO_THREADS, len(paths))) as pool:
        return sum(pool.map(delete, sorted(paths)))


# --- what the table references -------------------------------------------------------------------


@dataclass
class Reachable:
    """Files reachable from a set of snapshots, as canonical paths."""

    manifest_lists: set[str] = field(default_factory=set)
    manifests: set[str] = field(default_factory=set)
    content_files: set[str] = field(default_factory=set)  # data and delete files

    def all(self) -> set[str]:
        return self.manifest_lists | self.manifests | self.content_files


def reachable_files(
    io: FileIO,
    snapshots: Iterable[Snapshot],
    *,
    skip_manifests: Collection[str] = (),
    live_only: bool = False,
) -> Reachable:
    """The manifest lists, manifests and data/delete files the snapshots reference.

    With ``live_only``, only the files the snapshots can read (manifest entries added or
    existing); otherwise every file any entry mentions, deleted ones too. Manifests in
    ``skip_manifests`` (canonical paths) are listed but not opened.
    """
    reachable = Reachable()
    manifests: dict[str, ManifestFile] = {}
    for snapshot in snapshots:
        reachable.manifest_lists.add(canonical_path(snapshot.manifest_list))
        for manifest in snapshot.manifests(io):
            path = canonical_path(manifest.manifest_path)
            reachable.manifests.add(path)
            if path not in skip_manifests:
                manifests.setdefault(path, manifest)

    def entries(manifest: ManifestFile) -> list[str]:
        found = manifest.fetch_manifest_entry(io, discard_deleted=live_only)
        return [canonical_path(e.data_file.file_path) for e in found]

    if manifests:
        with ThreadPoolExecutor(min(IO_THREADS, len(manifests))) as pool:
            for paths in pool.map(entries, manifests.values()):
                reachable.content_files.update(paths)
    return reachable


def metadata_files(metadata: TableMetadata, metadata_location: str | None) -> set[str]:
    """The metadata JSON files the table still lists (log and current) and its statistics files."""
    paths = {canonical_path(entry.metadata_file) for entry in metadata.metadata_log}
    if metadata_location:
        paths.add(canonical_path(metadata_location))
    for stats in (*metadata.statistics, *metadata.partition_statistics):
        paths.add(canonical_path(stats.statistics_path))
    return paths


def referenced_files(table: Table) -> set[str]:
    """Every file any metadata of ``table`` references: all snapshots, metadata log, statistics."""
    reachable = reachable_files(table.io, table.metadata.snapshots)
    return reachable.all() | metadata_files(table.metadata, table.metadata_location)


def pending_paths(registry: PendingRegistry | None, table: str) -> set[str]:
    """The files of the table's pending batches (which a prepared commit's batches are, too)."""
    if registry is None:
        return set()
    paths = set()
    for entry_json in registry.pending_entries(table).values():
        try:
            entry = orjson.loads(entry_json)
        except orjson.JSONDecodeError:
            logger.warning("%s: a pending entry is not JSON; its files cannot be protected", table)
            continue
        for data_file in entry.get("files", ()) if isinstance(entry, dict) else ():
            if isinstance(data_file, dict) and isinstance(data_file.get("file_path"), str):
                paths.add(canonical_path(data_file["file_path"]))
    return paths


# --- orphans -------------------------------------------------------------------------------------


@dataclass
class OrphanReport:
    """What :func:`remove_orphans` found under one table's location."""

    table: str
    listed: int = 0
    referenced: int = 0
    pending: int = 0
    too_young: int = 0
    quarantined: int = 0
    orphans: list[str] = field(default_factory=list)
    orphan_bytes: int = 0
    deleted: int = 0
    dry_run: bool = False


def remove_orphans(
    table: Table,
    *,
    registry: PendingRegistry | None,
    min_age_s: float,
    dry_run: bool = False,
    now_ms: int | None = None,
) -> OrphanReport:
    """Delete the files under ``table``'s location that nothing references and that are older
    than ``min_age_s``; never a pending file. With ``dry_run``, only report them."""
    name = ".".join(table.name())
    report = OrphanReport(name, dry_run=dry_run)
    location = table.location()
    # Order matters (see the module docstring): list, then read pending, then refresh.
    listed = list_files(table.io, location)
    protected = pending_paths(registry, name)
    table = table.refresh()
    reachable = reachable_files(table.io, table.metadata.snapshots)
    referenced = reachable.all() | metadata_files(table.metadata, table.metadata_location)
    content_keys = {unquote(p) for p in reachable.content_files}
    matched_content = 0
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    horizon_ms = now_ms - int(min_age_s * 1000)
    report.listed = len(listed)
    # Compared percent-decoded: two spellings of one name protect it rather than delete it.
    referenced_keys = {unquote(p) for p in referenced}
    protected_keys = {unquote(p) for p in protected}
    sizes = {}
    kept_aside = canonical_path(f"{location.rstrip('/')}/{QUARANTINE_DIR}/")
    for listed_file in listed:
        path = listed_file.path
        key = unquote(path)
        if path.startswith(kept_aside):  # quarantined files are kept until an operator decides
            report.quarantined += 1
        elif key in referenced_keys:
            report.referenced += 1
            matched_content += key in content_keys
        elif key in protected_keys:
            report.pending += 1
        elif listed_file.modified_ms > horizon_ms:
            report.too_young += 1
        else:
            report.orphans.append(path)
            sizes[path] = listed_file.size
    if content_keys and not matched_content:
        # The table has data files, yet none of them is in the listing: its references are
        # spelt differently (another bucket alias, scheme or mount), or its data lives elsewhere.
        # Deleting would destroy the table.
        raise StorageError(
            f"{name}: none of the table's {len(content_keys)} data files is among the "
            f"{len(listed)} files listed under {location}: refusing to remove orphans"
        )
    report.orphans.sort()
    report.orphan_bytes = sum(sizes.values())
    if not dry_run:
        report.deleted = delete_files(table.io, report.orphans)
    logger.info(
        "%s: %d file(s) listed, %d orphan(s) (%d bytes) %s; %d pending and %d younger than %ss kept",
        name,
        report.listed,
        len(report.orphans),
        report.orphan_bytes,
        "found (dry run)" if dry_run else "deleted",
        report.pending,
        report.too_young,
        min_age_s,
    )
    return report


__all__ = [
    "ListedFile",
    "OrphanReport",
    "Reachable",
    "canonical_path",
    "delete_files",
    "list_files",
    "metadata_files",
    "pending_paths",
    "reachable_files",
    "referenced_files",
    "remove_orphans",
]
