"""The two ways a writer reads a batch: the compiled path when it can answer, else the reference.

:func:`compile_batch` tries :mod:`common.write.compiled` on the whole payload: plain NDJSON whose
events all go to one existing table (evolve or strict mode, no renamed keys, not registered yet)
and all fit it exactly. Anything else, and ``ICEFLEET_HOT_PATH=reference``, gives None and the
writer parses with :func:`common.ingest.events.parse_batch` and projects event by event
(:class:`ReferenceSource`). Both hand the writer the same things: how many valid events, the dead
letters, the files of a chunk of events, and the rest of a split batch as NDJSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from common.ingest.events import DeadLetter, Event, ParsedBatch
from common.ingest.routing import TableName
from common.schema.layout import aliases
from common.settings import Settings
from common.write.compiled import CompiledRows, Unfit, compile_rows, first_type, ndjson_lines

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    """What one chunk of a batch wrote: files per table, and events its tables rejected."""

    start: int
    end: int
    files: dict[TableName, list[DataFile]] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    rejected: list[tuple[TableName, int]] = field(default_factory=list)  # (table, position)


class Source(Protocol):
    @property
    def path(self) -> str: ...  # "compiled" or "reference"

    @property
    def count(self) -> int: ...  # valid events

    @property
    def dead_letters(self) -> list[DeadLetter]: ...

    def write_chunk(self, start: int, end: int, whole: bool) -> Chunk: ...

    def rest(self, start: int) -> str: ...


WriteEvents = Callable[[list[Event], tuple[int, int], bool], Chunk]
WriteRows = Callable[[dict[int | None, pa.Table], tuple[int, int] | None], list[DataFile]]


@dataclass
class ReferenceSource:
    """Events parsed and validated one by one in Python (:func:`~common.ingest.events.parse_batch`)."""

    parsed: ParsedBatch
    write_events: WriteEvents  # a chunk's events, its bounds, whether it is the whole batch
    path: str = "reference"

    @property
    def count(self) -> int:
        return len(self.parsed.events)

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return self.parsed.dead_letters

    def write_chunk(self, start: int, end: int, whole: bool) -> Chunk:
        return self.write_events(self.parsed.events[start:end], (start, end), whole)

    def rest(self, start: int) -> str:
        return "".join(f"{event.raw}\n" for event in self.parsed.events[start:])


@dataclass
class CompiledSource:
    """A payload read by the compiled path: all of its events, valid, in one table's layout."""

    name: TableName
    rows: CompiledRows
    write_rows: WriteRows  # rows by day, the chunk's bounds (None: the whole batch)
    delete_files: Callable[[list[DataFile]], object]  # files written but not to be registered
    path: str = "compiled"
    dead_letters: list[DeadLetter] = field(default_factory=list)  # none, or no answer

    @property
    def count(self) -> int:
        return len(self.rows)

    def write_chunk(self, start: int, end: int, whole: bool) -> Chunk:
        chunk = Chunk(start, end)
        bounds = None if whole else (start, end)
        chunk.files[self.name] = self.write_rows(self.rows.by_day(start, end), bounds)
        return chunk

    def rest(self, start: int) -> str:
        return self.rows.raw_lines(start)

    def discard(self, chunks: list[Chunk]) -> None:
        """Delete the files of chunks that will not be registered (best effort: a file left
        behind is an orphan, which maintenance removes)."""
        files = [file for chunk in chunks for parts in chunk.files.values() for file in parts]
        try:
            self.delete_files(files)
        except Exception:  # the write goes on; orphans are swept later
            logger.warning("could not delete %d unregistered file(s)", len(files), exc_info=True)


@dataclass(frozen=True)
class Lake:
    """What the compiled path asks of the writer's world: routing, tables, registrations."""

    settings: Settings
    route: Callable[[str], TableName]
    load: Callable[[TableName], Table | None]  # None: no such table
    is_known: Callable[[TableName], bool]  # the batch is registered or committed for it
    arrow_schema: Callable[[Table], pa.Schema]


def compile_batch(
    lake: Lake,
    batch_id: str,
    payload: bytes | str,
    fixed: TableName | None,
    ingested_at: datetime,
) -> tuple[TableName, Table, CompiledRows] | None:
    """The batch through the compiled path (its table, the table, its rows), or None: the
    reference path must take it."""
    settings = lake.settings
    if settings.hot_path != "compiled":
        return None
    try:
        lines = ndjson_lines(payload)
        name = fixed or lake.route(first_type(lines))
        if settings.mode_for(str(name)) == "raw":
            raise Unfit("raw mode")
        table = lake.load(name)
        if table is None:
            raise Unfit("the table is to be created")
        if aliases(table.metadata.properties):
            raise Unfit("the table has renamed keys")
        if lake.is_known(name):
            raise Unfit("already registered or committed")
        rows = compile_rows(
            lines,
            lake.arrow_schema(table),
            max_event_bytes=settings.max_event_bytes,
            batch_id=batch_id,
            ingested_at=ingested_at,
        )
        if fixed is None:
            types = pc.unique(rows.rows.column("type")).to_pylist()
            if any(lake.route(t) != name for t in types):
                raise Unfit("events for several tables")
    except Unfit as why:
        logger.debug("batch %s: reference path (%s)", batch_id, why)
        return None
    return name, table, rows
