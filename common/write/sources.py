"""The two ways a writer reads a batch: the compiled path when it can answer, else the reference.

:func:`compiled_source` tries :mod:`common.write.compiled` on the whole payload: plain NDJSON whose
events all go to one existing table (evolve or strict mode, no renamed keys, not registered yet)
and all fit it exactly. Anything else, and ``ICEFLEET_HOT_PATH=reference``, gives None and the
writer parses with :func:`common.ingest.events.parse_batch` and projects event by event
(:class:`ReferenceSource`). Both hand the writer the same things: how many valid events, the dead
letters, the files of a chunk of events, and the rest of a split batch as NDJSON.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import pyarrow.compute as pc
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from common.ingest.events import DeadLetter, ParsedBatch
from common.ingest.routing import TableName
from common.schema.layout import aliases
from common.write.compiled import CompiledRows, Unfit, compile_rows, first_type, ndjson_lines

if TYPE_CHECKING:
    from common.write.batch_writer import BatchWriter

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    """What one chunk of a batch wrote: files per table, and events its tables rejected."""

    start: int
    end: int
    files: dict[TableName, list[DataFile]] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)


class Source(Protocol):
    @property
    def path(self) -> str: ...  # "compiled" or "reference"

    @property
    def count(self) -> int: ...  # valid events

    @property
    def dead_letters(self) -> list[DeadLetter]: ...

    def write_chunk(self, start: int, end: int, whole: bool) -> Chunk: ...

    def rest(self, start: int) -> str: ...


@dataclass
class ReferenceSource:
    """Events parsed and validated one by one in Python (:func:`~common.ingest.events.parse_batch`)."""

    writer: BatchWriter
    batch_id: str
    parsed: ParsedBatch
    fixed: TableName | None
    ingested_at: datetime
    known: dict[TableName, bool]
    attempt: str
    path: str = "reference"

    @property
    def count(self) -> int:
        return len(self.parsed.events)

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return self.parsed.dead_letters

    def write_chunk(self, start: int, end: int, whole: bool) -> Chunk:
        return self.writer.write_events(
            self.batch_id,
            self.parsed.events[start:end],
            (start, end),
            whole=whole,
            fixed=self.fixed,
            ingested_at=self.ingested_at,
            known=self.known,
            attempt=self.attempt,
        )

    def rest(self, start: int) -> str:
        return "".join(f"{event.raw}\n" for event in self.parsed.events[start:])


@dataclass
class CompiledSource:
    """A payload read by the compiled path: all of its events, valid, in one table's layout."""

    writer: BatchWriter
    batch_id: str
    name: TableName
    table: Table
    rows: CompiledRows
    attempt: str
    path: str = "compiled"
    dead_letters: list[DeadLetter] = field(default_factory=list)  # none, or no answer

    @property
    def count(self) -> int:
        return len(self.rows)

    def write_chunk(self, start: int, end: int, whole: bool) -> Chunk:
        chunk = Chunk(start, end)
        by_day = self.rows.by_day(start, end)
        bounds = None if whole else (start, end)
        chunk.files[self.name] = self.writer.write_rows(
            self.name, self.table, by_day, self.batch_id, self.attempt, bounds
        )
        return chunk

    def rest(self, start: int) -> str:
        return self.rows.raw_lines(start)


def compiled_source(
    writer: BatchWriter,
    batch_id: str,
    payload: bytes | str,
    fixed: TableName | None,
    ingested_at: datetime,
    known: dict[TableName, bool],
    attempt: str,
) -> CompiledSource | None:
    """The batch through the compiled path, or None: the reference path must take it."""
    settings = writer.settings
    if settings.hot_path != "compiled":
        return None
    try:
        lines = ndjson_lines(payload)
        name = fixed or writer.router.table_for(first_type(lines))
        if settings.mode_for(str(name)) == "raw":
            raise Unfit("raw mode")
        table = writer.catalog_retry.call(f"load table {name}", writer.store.load, name)
        if table is None:
            raise Unfit("the table is to be created")
        if aliases(table.metadata.properties):
            raise Unfit("the table has renamed keys")
        if writer.registry is not None and writer.registry.is_known(str(name), batch_id):
            raise Unfit("already registered or committed")
        rows = compile_rows(
            lines,
            writer.plans.for_table(table).arrow_schema,
            max_event_bytes=settings.max_event_bytes,
            batch_id=batch_id,
            ingested_at=ingested_at,
        )
        if fixed is None:
            types = pc.unique(rows.rows.column("type")).to_pylist()
            if any(writer.router.table_for(t) != name for t in types):
                raise Unfit("events for several tables")
    except Unfit as why:
        logger.debug("batch %s: reference path (%s)", batch_id, why)
        return None
    known[name] = False
    return CompiledSource(writer, batch_id, name, table, rows, attempt)
