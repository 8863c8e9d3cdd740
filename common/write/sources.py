"""The two ways a writer reads a batch: the compiled path when it can answer, else the reference.

:func:`compile_batch` tries :mod:`common.write.compiled` on the whole payload: plain NDJSON whose
events all go to existing tables (evolve or strict mode, no renamed keys, not registered yet)
and all fit them exactly. Events of several tables are cut into one payload per table by their
``type`` (read exactly, :func:`~common.write.compiled.line_types`), and each is read with its
table's schema; the table of every row is checked from its type after reading. Anything else in
any of them, and ``ICEFLEET_HOT_PATH=reference``, gives None for the whole batch, and the writer
parses with :func:`common.ingest.events.parse_batch` and projects event by event
(:class:`ReferenceSource`). Both hand the writer the same things: how many valid events, the dead
letters, the files of a chunk of events (per table), and the rest of a split batch as NDJSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from common.ingest.events import DeadLetter, Event, ParsedBatch
from common.ingest.routing import DEAD_LETTER_ROUTE, TableName
from common.schema.layout import aliases
from common.settings import Settings
from common.write.compiled import (
    CompiledRows,
    Ndjson,
    Unfit,
    compile_rows,
    first_type,
    line_types,
    ndjson_lines,
    select_lines,
)

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
WriteRows = Callable[
    ["CompiledPart", dict[int | None, pa.Table], tuple[int, int] | None], list[DataFile]
]


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


@dataclass(frozen=True)
class CompiledPart:
    """The events of one table in a payload the compiled path read, as that table's rows."""

    name: TableName
    table: Table
    rows: CompiledRows
    indexes: np.ndarray | None = None  # each row's event index, ascending (None: every event)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The rows of the events ``[start, end)``: a run of rows, as indexes ascend."""
        if self.indexes is None:
            return start, min(end, len(self.rows))
        low, high = np.searchsorted(self.indexes, (start, end))
        return int(low), int(high)


@dataclass
class CompiledSource:
    """A payload read by the compiled path: all of its events, valid, each in its table's
    layout (one part per table, in the order the tables first appear)."""

    parts: list[CompiledPart]
    lines: Ndjson
    write_rows: WriteRows  # a part's rows by day, the chunk's bounds (None: the whole batch)
    delete_files: Callable[[CompiledPart, list[DataFile]], object]  # files not to be registered
    path: str = "compiled"
    dead_letters: list[DeadLetter] = field(default_factory=list)  # none, or no answer

    @property
    def count(self) -> int:
        return self.lines.count

    @property
    def names(self) -> list[TableName]:
        return [part.name for part in self.parts]

    def write_chunk(self, start: int, end: int, whole: bool) -> Chunk:
        """The files of events ``[start, end)``, table by table as the reference path writes
        them (a table without an event in the chunk writes nothing)."""
        chunk = Chunk(start, end)
        bounds = None if whole else (start, end)
        for part in self.parts:
            low, high = part.span(start, end)
            if high > low:
                chunk.files[part.name] = self.write_rows(part, part.rows.by_day(low, high), bounds)
        return chunk

    def rest(self, start: int) -> str:
        return self.lines.rest(start)

    def discard(self, chunks: list[Chunk]) -> None:
        """Delete the files of chunks that will not be registered (best effort: a file left
        behind is an orphan, which maintenance removes)."""
        for part in self.parts:
            files = [file for chunk in chunks for file in chunk.files.get(part.name, [])]
            if not files:
                continue
            try:
                self.delete_files(part, files)
            except Exception:  # the write goes on; orphans are swept later
                logger.warning(
                    "could not delete %d unregistered file(s)", len(files), exc_info=True
                )


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
) -> tuple[Ndjson, list[CompiledPart]] | None:
    """The batch through the compiled path (its lines, and its events' rows per table), or
    None: the reference path must take it."""
    settings = lake.settings
    if settings.hot_path != "compiled":
        return None
    try:
        lines = ndjson_lines(payload)
        groups = {fixed: None} if fixed is not None else _tables_of(lake, lines)
        tables = {name: _open(lake, name) for name in groups}  # all before reading any rows
        parts = [
            _compile_part(lake, name, tables[name], lines, indexes, batch_id, ingested_at, fixed)
            for name, indexes in groups.items()
        ]
    except Unfit as why:
        logger.debug("batch %s: reference path (%s)", batch_id, why)
        return None
    return lines, parts


def _tables_of(lake: Lake, lines: Ndjson) -> dict[TableName, np.ndarray | None]:
    """The events of each table (their indexes; None: all of them), tables in the order they
    first appear. A payload whose every line carries the first line's ``"type":"..."`` text
    (counted in its bytes) is taken for one table without reading the types: its rows' types
    are checked after reading (:func:`_compile_part`)."""
    event_type = first_type(lines)
    needle = b'"type":' + orjson.dumps(event_type)
    if lines.body.count(needle) == lines.count:
        return {lake.route(event_type): None}
    encoded = line_types(lines).dictionary_encode()
    names = [lake.route(t) for t in encoded.dictionary.to_pylist()]
    order = {name: n for n, name in enumerate(dict.fromkeys(names))}  # first seen, first
    table_of = np.array([order[name] for name in names], dtype=np.int64)[
        encoded.indices.to_numpy(zero_copy_only=False)
    ]
    if len(order) == 1:
        return {names[0]: None}
    return {name: np.flatnonzero(table_of == n) for name, n in order.items()}


def _open(lake: Lake, name: TableName) -> Table:
    """The table, if the compiled path may write its rows: it exists, is not raw, has no
    renamed keys, and this batch is neither registered nor committed for it yet."""
    if name == DEAD_LETTER_ROUTE:
        raise Unfit("no route")
    if lake.settings.mode_for(str(name)) == "raw":
        raise Unfit("raw mode")
    table = lake.load(name)
    if table is None:
        raise Unfit("the table is to be created")
    if aliases(table.metadata.properties):
        raise Unfit("the table has renamed keys")
    if lake.is_known(name):
        raise Unfit("already registered or committed")
    return table


def _compile_part(
    lake: Lake,
    name: TableName,
    table: Table,
    lines: Ndjson,
    indexes: np.ndarray | None,
    batch_id: str,
    ingested_at: datetime,
    fixed: TableName | None,
) -> CompiledPart:
    """The rows of the events at ``indexes`` (None: all) in ``table``; Unfit unless every one
    fits it exactly and, routed (no ``fixed`` table), has a type that routes to it."""
    rows = compile_rows(
        lines if indexes is None else select_lines(lines, indexes),
        lake.arrow_schema(table),
        max_event_bytes=lake.settings.max_event_bytes,
        batch_id=batch_id,
        ingested_at=ingested_at,
    )
    if fixed is None:
        types = pc.unique(rows.rows.column("type")).to_pylist()
        if any(lake.route(t) != name for t in types):
            raise Unfit("events for another table")
    return CompiledPart(name, table, rows, indexes)
