"""``icefleet sync-catalog``: tables whose metadata is in the warehouse but not in the catalog.

A lost SQLite catalog, or tables made by another tool, leave complete tables in the warehouse that
no catalog knows. :func:`sync_catalog` walks the warehouse the way catalogs lay it out,
``<warehouse>/<namespace>/<table>/metadata/<version>-<uuid>.metadata.json`` (pyiceberg's SQL
catalog) or ``<namespace>.db/<table>`` (Hive style), one level at a time (it never lists data
files), and for each table:

- not in the catalog: registers its newest metadata file (``catalog.register_table``), under the
  table lock, creating the namespace if needed;
- in the catalog, pointing at the newest metadata: in sync;
- in the catalog, pointing at an older metadata version than the newest in the warehouse: stale,
  *reported, not overwritten*. A failed commit also leaves a newer metadata file behind, so only
  an operator who has looked can tell which one is right.

Works for ``file://`` and ``s3://`` warehouses (listing through the FileIO's pyarrow filesystem).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError
from pyiceberg.io import FileIO, load_file_io

from common.errors import ConfigError
from common.maintenance.orphans import ListedFile, canonical_path, list_files

logger = logging.getLogger(__name__)

NAMESPACE_SUFFIX = ".db"
_VERSION = re.compile(r"^(?:v)?(\d+)[-.].*\.metadata\.json$")
LockFactory = Callable[[str], AbstractContextManager[object]]


def metadata_version(path: str) -> int | None:
    """The version number in a metadata file name (``00012-<uuid>.metadata.json`` → 12)."""
    match = _VERSION.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class WarehouseTable:
    """A table found in the warehouse, with its newest metadata file."""

    namespace: str
    name: str
    metadata_location: str
    version: int
    candidates: int = 1  # metadata files with that same newest version (>1: ambiguous)

    @property
    def identifier(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass
class SyncReport:
    """What :func:`sync_catalog` found and did."""

    warehouse: str
    registered: list[tuple[str, str]] = field(default_factory=list)
    in_sync: list[str] = field(default_factory=list)
    stale: list[tuple[str, str, str]] = field(default_factory=list)  # name, catalog's, newest
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False


def _newest(files: list[ListedFile]) -> tuple[ListedFile, int, int] | None:
    versioned = [(metadata_version(f.path), f) for f in files]
    known = [(v, f) for v, f in versioned if v is not None]
    if not known:
        return None
    top = max(v for v, _ in known)
    best = [f for v, f in known if v == top]
    newest = max(best, key=lambda f: (f.modified_ms, f.path))
    return newest, top, len(best)


def find_tables(io: FileIO, warehouse: str) -> list[WarehouseTable]:
    """Every ``<namespace>[.db]/<table>`` under ``warehouse`` that has a metadata file."""
    found = []
    for ns_dir in list_files(io, warehouse, recursive=False, directories=True):
        if not ns_dir.is_dir:
            continue
        namespace = ns_dir.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(NAMESPACE_SUFFIX)
        for table_dir in list_files(io, ns_dir.path, recursive=False, directories=True):
            if not table_dir.is_dir:
                continue
            name = table_dir.path.rstrip("/").rsplit("/", 1)[-1]
            metadata = [
                f
                for f in list_files(io, f"{table_dir.path}/metadata", recursive=False)
                if f.path.endswith(".metadata.json")
            ]
            newest = _newest(metadata)
            if newest is not None:
                listed, version, count = newest
                found.append(WarehouseTable(namespace, name, listed.path, version, count))
    return sorted(found, key=lambda t: t.identifier)


def warehouse_of(catalog: Catalog) -> str:
    """The catalog's warehouse location, if it is a path the listing can walk."""
    warehouse = catalog.properties.get("warehouse")
    if not warehouse or ("://" not in warehouse and not warehouse.startswith("/")):
        raise ConfigError(
            "warehouse",
            warehouse,
            "a file:// or s3:// location in the catalog's properties (sync-catalog lists it)",
        )
    return str(warehouse)


def sync_catalog(
    catalog: Catalog,
    *,
    warehouse: str | None = None,
    io: FileIO | None = None,
    lock_for: LockFactory | None = None,
    dry_run: bool = False,
) -> SyncReport:
    """Register the warehouse's tables the catalog lacks; report stale entries (see module doc)."""
    warehouse = warehouse or warehouse_of(catalog)
    io = io or load_file_io(catalog.properties, warehouse)
    report = SyncReport(warehouse, dry_run=dry_run)
    by_namespace: dict[str, list[WarehouseTable]] = defaultdict(list)
    for found in find_tables(io, warehouse):
        by_namespace[found.namespace].append(found)
    for namespace, tables in sorted(by_namespace.items()):
        for found in tables:
            if found.candidates > 1:
                report.notes.append(
                    f"{found.identifier}: {found.candidates} metadata files have version "
                    f"{found.version}; the newest by time is {found.metadata_location}"
                )
            if catalog.table_exists((namespace, found.name)):
                _compare(catalog, found, report)
                continue
            if dry_run:
                report.registered.append((found.identifier, found.metadata_location))
                continue
            with suppress(NamespaceAlreadyExistsError):
                catalog.create_namespace(namespace)
            lock = lock_for(found.identifier) if lock_for is not None else nullcontext()
            with lock:
                try:
                    catalog.register_table((namespace, found.name), found.metadata_location)
                except TableAlreadyExistsError:  # registered meanwhile by someone else
                    _compare(catalog, found, report)
                    continue
            logger.info("registered %s at %s", found.identifier, found.metadata_location)
            report.registered.append((found.identifier, found.metadata_location))
    return report


def _compare(catalog: Catalog, found: WarehouseTable, report: SyncReport) -> None:
    table = catalog.load_table((found.namespace, found.name))
    current = canonical_path(table.metadata_location)
    if current == canonical_path(found.metadata_location):
        report.in_sync.append(found.identifier)
        return
    version = metadata_version(current)
    if version is not None and version < found.version:
        report.stale.append((found.identifier, current, found.metadata_location))
    else:
        report.in_sync.append(found.identifier)


__all__ = [
    "SyncReport",
    "WarehouseTable",
    "find_tables",
    "metadata_version",
    "sync_catalog",
    "warehouse_of",
]
