"""The writer's core: a batch of CloudEvents in, Parquet data files and their DataFiles out.

One file per (table, ``day(time)`` partition) per batch, at a path derived from the batch id: a
redelivered batch rewrites the same objects instead of adding new ones. The file's content is
deterministic too (``_ingested_at`` is the batch's enqueue time, not the write time), so two
attempts of one batch racing each other write the same bytes.

A batch that is already registered as pending, or already committed, for a table is not written
again for that table: once a file is registered it is never overwritten, because the committer
may be about to commit the DataFile that describes it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.io.pyarrow import (
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
    schema_to_pyarrow,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.typedef import Record

from common.catalog import TableStore
from common.datafiles import data_file_to_dict
from common.events import DeadLetter, Event, parse_batch
from common.routing import Router, TableName
from common.schema import Projection, aliases, desired_schema, project
from common.settings import SchemaMode, Settings

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class Registry(Protocol):
    """What the writer needs of the pending registry (:class:`common.pending.PendingRegistry`)."""

    def is_known(self, table: str, batch_id: str) -> bool: ...

    def register(self, table: str, batch_id: str, entry_json: str) -> bool: ...


@dataclass
class BatchResult:
    """What one batch became."""

    batch_id: str
    events: int = 0
    files: dict[str, list[DataFile]] = field(default_factory=dict)
    skipped_tables: list[str] = field(default_factory=list)  # already registered or committed
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(f.record_count for files in self.files.values() for f in files)


def file_stem(batch_id: str) -> str:
    """A path-safe, collision-free file name stem for a batch id of any content."""
    digest = hashlib.sha256(batch_id.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    readable = _UNSAFE.sub("_", batch_id)[:40].strip("_")
    return f"{readable}-{digest}" if readable else digest


def partition_day(event: Event) -> int | None:
    """``day(time)`` as Iceberg stores it: days since 1970-01-01, or None without a time."""
    if event.time is None:
        return None
    return (event.time - EPOCH) // timedelta(days=1)


def data_file_path(table_location: str, batch_id: str, day: int | None) -> str:
    label = "null" if day is None else (date(1970, 1, 1) + timedelta(days=day)).isoformat()
    return f"{table_location.rstrip('/')}/data/time_day={label}/{file_stem(batch_id)}.parquet"


def write_data_file(
    table: Table,
    rows: pa.Table,
    path: str,
    partition: Record,
    *,
    row_group_rows: int,
    compression: str,
) -> DataFile:
    """Write ``rows`` as one Parquet file at ``path`` and describe it from its own footer."""
    schema = table.schema()
    output = table.io.new_output(path)
    with output.create(overwrite=True) as stream:
        writer = pq.ParquetWriter(
            stream,
            rows.schema,
            compression=None if compression == "none" else compression,
            write_statistics=True,
        )
        try:
            writer.write_table(rows, row_group_size=row_group_rows)
        finally:
            writer.close()
        size = stream.tell()
    stats = data_file_statistics_from_parquet_metadata(
        parquet_metadata=writer.writer.metadata,
        stats_columns=compute_statistics_plan(schema, table.metadata.properties),
        parquet_column_mapping=parquet_path_to_id_mapping(schema),
    )
    data_file = DataFile.from_args(
        content=DataFileContent.DATA,
        file_path=path,
        file_format=FileFormat.PARQUET,
        partition=partition,
        file_size_in_bytes=size,
        sort_order_id=None,
        equality_ids=None,
        key_metadata=None,
        **stats.to_serialized_dict(),
    )
    data_file.spec_id = table.metadata.default_spec_id
    return data_file


def pending_entry(batch_id: str, files: Sequence[DataFile]) -> str:
    """The JSON the pending registry keeps for one batch of one table."""
    return orjson.dumps(
        {
            "batch_id": batch_id,
            "files": [data_file_to_dict(f) for f in files],
            "records": sum(f.record_count for f in files),
            "bytes": sum(f.file_size_in_bytes for f in files),
            "registered_ms": int(time.time() * 1000),
        }
    ).decode()


class BatchWriter:
    """Turns batches into registered Parquet files; one instance per worker process."""

    def __init__(
        self,
        settings: Settings,
        store: TableStore,
        router: Router,
        registry: Registry | None = None,
        dead_letter_sink: Callable[[list[DeadLetter]], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.registry = registry
        self.dead_letter_sink = dead_letter_sink

    def write(
        self,
        batch_id: str,
        payload: bytes | str,
        *,
        table: str | None = None,
        enqueued_at_ms: int | None = None,
    ) -> BatchResult:
        """Parse, route, write and register one batch. Invalid events become dead letters."""
        parsed = parse_batch(
            payload, batch_id=batch_id, max_event_bytes=self.settings.max_event_bytes
        )
        result = BatchResult(batch_id, events=len(parsed.events))
        result.dead_letters.extend(parsed.dead_letters)
        ingested_at = (
            datetime.fromtimestamp(enqueued_at_ms / 1000, UTC)
            if enqueued_at_ms is not None
            else datetime.now(UTC)
        )
        fixed = TableName.parse(table) if table is not None else None
        groups: dict[TableName, list[Event]] = defaultdict(list)
        for event in parsed.events:
            groups[fixed or self.router.table_for(event.attributes["type"])].append(event)
        for name, events in groups.items():
            if self.registry is not None and self.registry.is_known(str(name), batch_id):
                result.skipped_tables.append(str(name))
                continue
            files = self._write_table(name, events, batch_id, ingested_at, result)
            entry = pending_entry(batch_id, files)
            if files and self.registry and not self.registry.register(str(name), batch_id, entry):
                result.skipped_tables.append(str(name))
                continue
            if files:
                result.files[str(name)] = files
        if result.dead_letters and self.dead_letter_sink is not None:
            self.dead_letter_sink(result.dead_letters)
        return result

    def _write_table(
        self,
        name: TableName,
        events: list[Event],
        batch_id: str,
        ingested_at: datetime,
        result: BatchResult,
    ) -> list[DataFile]:
        mode = self.settings.mode_for(str(name))
        table = self.store.load(name)
        if table is None:  # created from what the whole batch carries (strict tables too)
            table = self.store.ensure(name, self._desired(mode, events))
        by_day: dict[int | None, list[Event]] = defaultdict(list)
        for event in events:
            by_day[partition_day(event)].append(event)
        projections = self._project(table, by_day, batch_id, ingested_at, mode)
        # Fast path: inference runs only on the events that spilled a value (a key without a
        # column, a value that does not fit); in a stream whose schema is settled that is none.
        spilled = [e for p in projections.values() for e in p.spilled]
        if spilled and mode == "evolve":
            evolved = self.store.ensure(name, self._desired(mode, spilled))
            if evolved.metadata_location != table.metadata_location:
                table = evolved
                projections = self._project(table, by_day, batch_id, ingested_at, mode)
        files = []
        for day, projection in projections.items():
            for event, reason in projection.rejected:
                result.dead_letters.append(
                    DeadLetter(batch_id, event.position, reason, "data", event.raw.encode())
                )
            if projection.table.num_rows == 0:
                continue
            path = data_file_path(table.location(), batch_id, day)
            files.append(
                write_data_file(
                    table,
                    projection.table,
                    path,
                    Record(day),
                    row_group_rows=self.settings.row_group_rows,
                    compression=self.settings.compression,
                )
            )
        logger.info(
            "batch %s: wrote %d file(s), %d rows to %s",
            batch_id,
            len(files),
            sum(f.record_count for f in files),
            name,
        )
        return files

    def _desired(self, mode: str, events: list[Event]) -> Callable[[Table | None, Schema], Schema]:
        def desired(table: Table | None, schema: Schema) -> Schema:
            if mode == "raw":
                return schema
            renamed = aliases(table.metadata.properties) if table is not None else {}
            return desired_schema(
                schema,
                events,
                max_columns=self.settings.max_columns,
                max_depth=self.settings.max_depth,
                renamed=renamed,
            )

        return desired

    def _project(
        self,
        table: Table,
        by_day: dict[int | None, list[Event]],
        batch_id: str,
        ingested_at: datetime,
        mode: SchemaMode,
    ) -> dict[int | None, Projection]:
        schema = table.schema()
        arrow_schema = schema_to_pyarrow(schema)
        renamed = aliases(table.metadata.properties)
        days = sorted(by_day, key=lambda day: (day is None, day or 0))
        return {
            day: project(
                by_day[day],
                schema,
                arrow_schema,
                batch_id=batch_id,
                ingested_at=ingested_at,
                mode=mode,
                renamed=renamed,
            )
            for day in days
        }
