"""Quarantine: a bad data file taken out of its table, kept aside, its rows counted and restorable.

:func:`quarantine_file`, in this order, so that nothing is ever without its record:

1. the file's bytes are copied, as they are, to ``<table location>/quarantine/<its path under the
   location>`` (same name and folders; S3 uploads carry a CRC32C, :mod:`common.lake.uploads`);
2. its rows are assessed: each row group's ``raw_event`` column read with page checksums checked
   (:mod:`common.lake.integrity`); values that read and decode as JSON are *restorable*; rows in a
   row group whose ``raw_event`` pages fail are *lost from this file* (their ``id`` values are
   listed when that column still reads, so the producer can send them again);
3. the record (:class:`QuarantineRecord`) is written as JSON beside the copy
   (``<copy>.quarantine.json``, durable with the data) and in Redis (``icefleet:quarantine:<table>``,
   for listing);
4. one snapshot removes the file from the table, under the table's lock, through
   :func:`common.maintenance.deletes.remove_data_files` (``icefleet.operation=quarantine``). The
   original object stays until snapshot expiry deletes it with the snapshots that still read it.

:func:`restore` re-enqueues the restorable ``raw_event`` values through the producer to the same
table, as batch ``quarantine-<digest of the file's path>`` (split ``<id>:<n>`` like any large
batch): the writers validate them again (an event that no longer passes is dead-lettered with the
reason) and registration by batch id lands a restore run twice only once. icefleet's orphan
removal never deletes under ``quarantine/`` (:mod:`common.maintenance.orphans`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis
from pyiceberg.io import FileIO
from pyiceberg.table import Table

from common.commit.committer import committed_seq
from common.coord import keys
from common.errors import CorruptDataFileError, StorageError
from common.lake.integrity import read_column_by_row_group, read_object
from common.lake.uploads import ObjectWriter
from common.maintenance.deletes import live_data_files, remove_data_files
from common.maintenance.orphans import QUARANTINE_DIR

logger = logging.getLogger(__name__)

RECORD_SUFFIX = ".quarantine.json"
MAX_LISTED_IDS = 1_000


@dataclass
class QuarantineRecord:
    """Everything known about one quarantined file; kept in Redis and beside the copy."""

    table: str
    original_path: str
    quarantine_path: str
    record_count: int
    file_size_in_bytes: int
    quarantined_ms: int
    reasons: list[str] = field(default_factory=list)
    status: str = "copied"  # copied -> removed (from the table) -> restored
    snapshot_id: int | None = None
    restorable_rows: int = 0
    undecodable_rows: int = 0  # raw_event read, but not JSON
    lost_rows: int = 0  # in row groups whose raw_event pages fail their checksums
    lost_ids: list[str] = field(default_factory=list)
    restored_rows: int = 0
    restored_batch_ids: list[str] = field(default_factory=list)
    restored_ms: int | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> QuarantineRecord:
        return cls(**orjson.loads(raw))

    @property
    def restore_batch_id(self) -> str:
        digest = hashlib.sha256(self.original_path.encode()).hexdigest()[:20]
        return f"quarantine-{digest}"


@dataclass(frozen=True)
class Assessment:
    restorable: list[str]
    undecodable: int
    lost: int
    lost_ids: list[str]  # the first MAX_LISTED_IDS, for the record
    lost_identities: list[tuple[str, str]]  # (source, id) of every lost row whose own are read


def quarantine_location(table: Table, path: str) -> str:
    """Where the copy of ``path`` (a file under the table's location) goes."""
    location = table.location().rstrip("/")
    relative = path[len(location) + 1 :] if path.startswith(location + "/") else path.split("/")[-1]
    return f"{location}/{QUARANTINE_DIR}/{relative}"


def assess(data: Any, path: str) -> Assessment:
    """Which rows of the file in ``data`` can be restored from their ``raw_event``."""
    restorable: list[str] = []
    undecodable = lost = 0
    lost_ids: list[str] = []
    identities: list[tuple[str, str]] = []
    columns = None
    for read in read_column_by_row_group(data, path, "raw_event"):
        if read.values is None:
            lost += read.rows
            if columns is None:
                columns = [read_column_by_row_group(data, path, name) for name in ("source", "id")]
            sources, ids = (column[read.row_group].values for column in columns)
            if ids is not None:
                room = MAX_LISTED_IDS - len(lost_ids)
                lost_ids += [str(v) for v in ids.to_pylist()[:room]]
                if sources is not None:
                    identities += zip(sources.to_pylist(), ids.to_pylist(), strict=True)
            continue
        for value in read.values.to_pylist():
            try:
                if value is not None and isinstance(orjson.loads(value), dict):
                    restorable.append(value)
                    continue
            except orjson.JSONDecodeError:
                pass
            undecodable += 1
    return Assessment(restorable, undecodable, lost, lost_ids, identities)


class QuarantineStore:
    """Records of quarantined files: Redis for listing, a JSON file beside each copy for good."""

    def __init__(self, client: redis.Redis, objects: ObjectWriter | None = None) -> None:
        self.client = client
        self.objects = objects or ObjectWriter()

    def save(self, io: FileIO, record: QuarantineRecord) -> None:
        import pyarrow as pa

        self.objects.write(
            io, record.quarantine_path + RECORD_SUFFIX, pa.py_buffer(record.to_json())
        )
        self.client.hset(keys.quarantine(record.table), record.original_path, record.to_json())

    def get(self, io: FileIO, table: Table, path: str) -> QuarantineRecord | None:
        """The record of ``path`` (its original or its quarantine path): Redis, else the copy's."""
        name = ".".join(table.name())
        for raw in self.client.hvals(keys.quarantine(name)):
            record = QuarantineRecord.from_json(raw)
            if path in (record.original_path, record.quarantine_path):
                return record
        sidecar = quarantine_location(table, path) + RECORD_SUFFIX
        try:
            return QuarantineRecord.from_json(read_object(io, sidecar).to_pybytes())
        except (FileNotFoundError, StorageError, OSError):
            return None

    def all(self, table: str | None = None) -> list[QuarantineRecord]:
        pattern = keys.quarantine(table or "*")
        records = []
        for key in sorted(self.client.scan_iter(match=pattern)):
            records += [QuarantineRecord.from_json(v) for v in self.client.hvals(key)]
        return sorted(records, key=lambda r: (r.table, r.quarantined_ms, r.original_path))


def quarantine_file(
    table: Table,
    path: str,
    store: QuarantineStore,
    *,
    lock: AbstractContextManager[object] | None = None,
    reasons: list[str] | None = None,
    now_ms: int | None = None,
    forget: Callable[[list[tuple[str, str]], str], object] | None = None,
) -> QuarantineRecord:
    """Copy ``path`` aside, record it, and remove it from ``table`` in one snapshot.

    Run again on a file already quarantined, it returns the record (finishing the removal if a
    crash came between the record and the snapshot). Once the file is out, ``forget(identities,
    table)`` drops the per-event dedupe claims of its *lost* rows, by (source, id)
    (:func:`common.coord.claims.forget_identities`): their producer is asked to send them again,
    which the claims would otherwise drop as repeats. Restorable rows keep theirs until
    :func:`restore` (which forgets them by their exact bytes).
    """
    name = ".".join(table.name())
    table = table.refresh()
    live = live_data_files(table)
    existing = store.get(table.io, table, path)
    if path not in live:
        if existing is not None:
            return existing
        raise ValueError(f"{path} is not a live data file of {name}")
    data_file = live[path]
    record = existing
    found: Assessment | None = None
    if record is None:
        data = read_object(table.io, path)
        copy = quarantine_location(table, path)
        store.objects.write(table.io, copy, data)
        found = assess(data, path)
        record = QuarantineRecord(
            table=name,
            original_path=path,
            quarantine_path=copy,
            record_count=data_file.record_count,
            file_size_in_bytes=data_file.file_size_in_bytes,
            quarantined_ms=int(time.time() * 1000) if now_ms is None else now_ms,
            reasons=list(reasons or []),
            restorable_rows=len(found.restorable),
            undecodable_rows=found.undecodable,
            lost_rows=found.lost,
            lost_ids=found.lost_ids,
        )
        store.save(table.io, record)
    properties = {
        "icefleet.operation": "quarantine",
        "icefleet.base-commit-seq": str(committed_seq(table)),
    }
    after = remove_data_files(table, [path], lock=lock, snapshot_properties=properties)
    if forget is not None:
        # found is None when an earlier run copied the file: read the copy, as restore does
        found = found or assess(read_object(table.io, record.quarantine_path), path)
        if found.lost_identities:
            forget(found.lost_identities, name)
    snapshot = after.current_snapshot()
    record.status = "removed"
    record.snapshot_id = snapshot.snapshot_id if snapshot else None
    store.save(table.io, record)
    logger.warning(
        "%s: quarantined %s (%d rows, %d restorable) to %s",
        name,
        path,
        record.record_count,
        record.restorable_rows,
        record.quarantine_path,
        extra={"table": name},
    )
    return record


def restore(
    table: Table,
    record: QuarantineRecord,
    store: QuarantineStore,
    enqueue: Callable[[list[str], str, str], list[str]],
    *,
    forget: Callable[[list[str], str], object] | None = None,
    now_ms: int | None = None,
) -> QuarantineRecord:
    """Send the restorable ``raw_event`` values of a quarantined file to its table again.

    ``enqueue(lines, table, batch_id)`` sends them and returns the batch ids sent (the producer's
    ``enqueue_many``). ``forget(lines, table)`` first drops the per-event dedupe claims those rows
    still hold (:func:`common.coord.claims.forget_raw_events`): they left the table with the file,
    and would otherwise be dropped as repeats of themselves. Only before the first restore: once
    restored, the claims belong to the rows that landed again. Nothing is deleted.
    """
    if record.status == "copied":
        raise ValueError(f"{record.original_path} is still in {record.table}: quarantine it first")
    data = read_object(table.io, record.quarantine_path)
    found = assess(data, record.quarantine_path)
    if not found.restorable:
        raise CorruptDataFileError(
            record.quarantine_path, "no raw_event value of it can be read and decoded"
        )
    if forget is not None and record.status != "restored":
        forget(found.restorable, record.table)
    record.restored_batch_ids = enqueue(found.restorable, record.table, record.restore_batch_id)
    record.restored_rows = len(found.restorable)
    record.restored_ms = int(time.time() * 1000) if now_ms is None else now_ms
    record.status = "restored"
    store.save(table.io, record)
    logger.info(
        "%s: %d row(s) of %s sent again as %s",
        record.table,
        record.restored_rows,
        record.original_path,
        record.restore_batch_id,
        extra={"table": record.table, "batch_id": record.restore_batch_id},
    )
    return record


__all__ = [
    "QUARANTINE_DIR",
    "Assessment",
    "QuarantineRecord",
    "QuarantineStore",
    "assess",
    "quarantine_file",
    "quarantine_location",
    "restore",
]
