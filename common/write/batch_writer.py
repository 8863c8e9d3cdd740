"""The writer's core: a batch of CloudEvents in, Parquet data files and their DataFiles out.

One file per (table, ``day(time)`` partition) per batch, at a path of the batch and of the write
attempt (:mod:`common.write.datafile_writer`). Registration decides which attempt counts: a batch that
is already registered as pending, or already committed, for a table is not written again for
that table, and of two attempts racing each other only the first to register its files is kept
(:meth:`common.coord.pending.PendingRegistry.register` is atomic).

A batch may be written in chunks with a deadline and split when it cannot finish in time
(:mod:`common.write.partial`); chunk files get paths of their own, derived from the batch id and the
chunk's event range. Storage and catalog calls are retried on transient errors
(:mod:`common.lake.retry`).

Before writing, the events of tables with dedupe on are claimed by their CloudEvents identity
(:mod:`common.coord.claims`, :mod:`common.write.dedupe`): a repeat of an event that landed or is
pending is not written; a byte-identical one is counted, one with other bytes is dead-lettered.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import pyarrow as pa
from pyiceberg.manifest import DataFile
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.typedef import Record

from common.coord.claims import EventClaims, Verdicts
from common.coord.pending import PendingEntry
from common.ingest.events import DeadLetter, Event, parse_batch, paused_gc
from common.ingest.routing import DEAD_LETTER_ROUTE, Router, TableName
from common.lake.catalog import TableStore
from common.lake.retry import is_transient_unless_locked, policies_for
from common.lake.uploads import ObjectWriter
from common.maintenance.orphans import delete_files
from common.schema.layout import Projection, aliases, desired_schema, project
from common.settings import SchemaMode, Settings
from common.wire import split_child_id
from common.write.datafile_writer import (
    FILE_WRITE_THREADS,
    FilePlans,
    FileWrites,
    attempt_token,
    chunk_file_path,
    data_file_path,
    write_data_file,
)
from common.write.dedupe import claim_compiled, claim_events, conflicts, release_rejected
from common.write.partial import WHOLE, Remainder, SplitConflictError
from common.write.sources import (
    Chunk,
    CompiledPart,
    CompiledSource,
    Lake,
    ReferenceSource,
    Source,
    compile_batch,
)
from common.write.table_limits import refusal, refused

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = EPOCH.toordinal()


class Registry(Protocol):
    """What the writer needs of the pending registry (:class:`common.coord.pending.PendingRegistry`)."""

    def is_known(self, table: str, batch_id: str) -> bool: ...

    def register(
        self, table: str, batch_id: str, entry_json: str, duplicates: tuple[int, int] = (0, 0)
    ) -> bool: ...


@dataclass
class BatchResult:
    """What one batch became."""

    batch_id: str
    events: int = 0
    files: dict[str, list[DataFile]] = field(default_factory=dict)
    skipped_tables: list[str] = field(default_factory=list)  # already registered or committed
    dead_letters: list[DeadLetter] = field(default_factory=list)
    remainder: Remainder | None = (
        None  # the events handed back after a split (common/write/partial.py)
    )
    path: str = "reference"  # or "compiled": which parse path took it (common/write/sources.py)
    # per table (dropped, conflicting) repeats of events that landed or are pending
    duplicates: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(f.record_count for files in self.files.values() for f in files)


@dataclass(frozen=True)
class ChunkPlan:
    """How a batch is written: its chunks' bounds, and when to stop early (a split)."""

    bounds: list[tuple[int, int]]
    can_split: bool
    deadline: float | None
    stop: Callable[[], bool] | None
    interrupt: tuple[type[BaseException], ...]


def _log_written(batch_id: str, files: list[DataFile], name: TableName) -> None:
    rows = sum(f.record_count for f in files)
    logger.info("batch %s: wrote %d file(s), %d rows to %s", batch_id, len(files), rows, name)


def partition_day(event: Event) -> int | None:
    """``day(time)`` as Iceberg stores it: days since 1970-01-01, or None without a time."""
    if event.time is None:
        return None
    return event.time.toordinal() - _EPOCH_ORDINAL  # times are in UTC (common/ingest/events.py)


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
        # a registry that keeps claims on event identities (PendingRegistry does) dedupes events
        self.claims: EventClaims | None = getattr(registry, "claims", None)
        self.dead_letter_sink = dead_letter_sink
        self.storage_retry, self.catalog_retry = policies_for(settings.retry_base_ms)
        self.clock: Callable[[], float] = time.monotonic  # tests may slow time down
        self.plans = FilePlans()
        self.objects = ObjectWriter(settings.s3_checksum)
        self._pool: ThreadPoolExecutor | None = None
        self._claimer: ThreadPoolExecutor | None = None

    @paused_gc()  # a fresh pause per call (contextlib's context managers work as decorators)
    def write(
        self,
        batch_id: str,
        payload: bytes | str,
        *,
        table: str | None = None,
        enqueued_at_ms: int | None = None,
        chunk_events: int | None = None,
        deadline: float | None = None,
        stop: Callable[[], bool] | None = None,
        interrupt: tuple[type[BaseException], ...] = (),
        split_at: int | None = None,
        on_split: Callable[[int], int] | None = None,
    ) -> BatchResult:
        """Parse, route, write and register one batch. Invalid events become dead letters.

        Partial progress (see :mod:`common.write.partial`): the valid events are written in chunks of
        ``chunk_events`` (all at once by default). Before each chunk after the first, the writer
        stops if the chunk would not end before ``deadline`` (a :attr:`clock` time) or ``stop()``
        says so; an exception in ``interrupt`` (Celery's soft time limit) raised inside a chunk
        abandons that chunk and stops too. On stopping after ``k`` events it calls
        ``on_split(k)``, which records the split and returns the split point in effect, registers
        the events before it, and returns the rest in :attr:`BatchResult.remainder`. Without
        ``on_split`` it never stops early. ``split_at`` (an earlier attempt's split) writes only
        the events before it and hands back the rest.

        The cyclic garbage collector is paused for the whole batch (see
        :func:`~common.ingest.events.paused_gc`): a batch's events stay alive until its files are
        written, and each collection in between would traverse all of them again.
        """
        ingested_at = (
            datetime.fromtimestamp(enqueued_at_ms / 1000, UTC)
            if enqueued_at_ms is not None
            else datetime.now(UTC)
        )
        fixed = TableName.parse(table) if table is not None else None
        known: dict[TableName, bool] = {}
        attempt = attempt_token()
        skip: set[int] = set()  # repeats of events that landed or are pending: not written

        source, reference = self._sources(
            batch_id, payload, fixed, ingested_at, known=known, attempt=attempt, skip=skip
        )
        limit = source.count if split_at is None else max(0, min(split_at, source.count))
        claimed = self._claim(batch_id, source, limit, fixed, known)
        verdicts: Verdicts | None = None
        if isinstance(source, ReferenceSource):  # it leaves the repeats out as it writes
            verdicts = claimed()
            skip.update(verdicts.skip)
        result = BatchResult(batch_id, events=source.count, path=source.path)
        result.dead_letters.extend(source.dead_letters)
        size = max(1, chunk_events or limit or 1)
        plan = ChunkPlan(
            bounds=[(start, min(start + size, limit)) for start in range(0, limit, size)],
            can_split=on_split is not None and split_at is None,
            deadline=deadline,
            stop=stop,
            interrupt=interrupt,
        )
        whole = len(plan.bounds) == 1 and limit == source.count  # one file per day, classic paths

        def go_on() -> bool:  # after the first chunk: the claims were made while it was written
            nonlocal verdicts
            verdicts = claimed()
            return not (verdicts.skip and isinstance(source, CompiledSource))

        chunks = self._write_chunks(batch_id, source, plan, whole, go_on)
        if verdicts is None:  # no chunk was written
            verdicts = claimed()
        skip.update(verdicts.skip)
        if skip and isinstance(source, CompiledSource):
            # the compiled path writes every row: with repeats to leave out (rare), its files go
            # and the reference path writes the batch (all events valid there too: same indexes)
            source.discard(chunks)
            source = reference()
            chunks = self._write_chunks(batch_id, source, plan, whole, lambda: True)
            result.path = source.path
        done = chunks[-1].end if chunks else 0
        if done < limit:
            assert on_split is not None
            recorded = on_split(done)
            if recorded != done:
                raise SplitConflictError(batch_id, done, recorded)
            split_at = done
        elif on_split is not None and split_at is None and source.count:
            # a whole attempt fixes the cut too, before it registers: an attempt racing it must
            # not split the batch afterwards (its child would land the rest a second time)
            recorded = on_split(WHOLE)
            if recorded != WHOLE:
                raise SplitConflictError(batch_id, source.count, recorded)
        if split_at is not None and split_at < source.count:
            result.remainder = Remainder(
                split_child_id(batch_id, split_at),
                split_at,
                source.count - split_at,
                source.rest(split_at),
            )
            logger.warning(
                "batch %s: split after %d of %d events; the rest goes on as %s",
                batch_id,
                split_at,
                source.count,
                result.remainder.batch_id,
            )
        self._finish(
            batch_id,
            source,
            verdicts,
            split_at if split_at is not None else limit,
            chunks,
            known,
            result,
        )
        return result

    def _write_chunks(
        self,
        batch_id: str,
        source: Source,
        plan: ChunkPlan,
        whole: bool,
        go_on: Callable[[], bool],
    ) -> list[Chunk]:
        """Write the chunks of ``plan`` in order until done, or until it must stop (see
        :meth:`write`); after the first chunk, stop at once if ``go_on()`` says so."""
        chunks: list[Chunk] = []  # appended whole: the truth about what is written
        last_s = 0.0
        for start, end in plan.bounds:
            if start and plan.can_split and self._must_stop(plan.deadline, plan.stop, last_s):
                break
            began = self.clock()
            try:
                chunks.append(source.write_chunk(start, end, whole))
            except plan.interrupt:
                if not (chunks and plan.can_split):
                    raise
                logger.warning("batch %s: interrupted in events [%d, %d)", batch_id, start, end)
                break
            last_s = self.clock() - began
            if len(chunks) == 1 and not go_on():
                break
        return chunks

    def _sources(
        self,
        batch_id: str,
        payload: bytes | str,
        fixed: TableName | None,
        ingested_at: datetime,
        *,
        known: dict[TableName, bool],
        attempt: str,
        skip: set[int],
    ) -> tuple[Source, Callable[[], ReferenceSource]]:
        """The batch's source (compiled when it can, else the reference path), and how to read
        it the reference way; a reference chunk leaves out the events in ``skip``."""

        def reference() -> ReferenceSource:
            parsed = parse_batch(
                payload, batch_id=batch_id, max_event_bytes=self.settings.max_event_bytes
            )

            def write_events(events: list[Event], bounds: tuple[int, int], whole: bool) -> Chunk:
                if skip:
                    events = [e for i, e in enumerate(events, bounds[0]) if i not in skip]
                return self.write_events(
                    batch_id,
                    events,
                    bounds,
                    whole=whole,
                    fixed=fixed,
                    ingested_at=ingested_at,
                    known=known,
                    attempt=attempt,
                )

            return ReferenceSource(parsed, write_events)

        source: Source
        compiled = compile_batch(self._lake(batch_id), batch_id, payload, fixed, ingested_at)
        if compiled is not None:
            lines, parts = compiled
            known.update((part.name, False) for part in parts)

            def write_rows(
                part: CompiledPart,
                by_day: dict[int | None, pa.Table],
                bounds: tuple[int, int] | None,
            ) -> list[DataFile]:
                return self.write_rows(part.name, part.table, by_day, batch_id, attempt, bounds)

            def delete(part: CompiledPart, files: list[DataFile]) -> int:
                return delete_files(part.table.io, [file.file_path for file in files])

            source = CompiledSource(parts, lines, write_rows, delete)
        else:
            source = reference()
        return source, reference

    def _finish(
        self,
        batch_id: str,
        source: Source,
        verdicts: Verdicts,
        written_upto: int,
        chunks: list[Chunk],
        known: dict[TableName, bool],
        result: BatchResult,
    ) -> None:
        """Count the repeats among the events this batch handles (those before its split point:
        the child judges the rest), dead-letter the conflicting ones, register, give back the
        claims of events a table rejected, and hand the dead letters over."""
        result.duplicates = verdicts.counts(before=written_upto)
        if isinstance(source, ReferenceSource):
            events = source.parsed.events
            result.dead_letters.extend(conflicts(batch_id, events, verdicts, written_upto))
            rejected = [(str(name), pos) for chunk in chunks for name, pos in chunk.rejected]
        self._register(batch_id, chunks, known, result)
        if isinstance(source, ReferenceSource):
            release_rejected(self.claims, self.settings, batch_id, events, rejected)
        if result.dead_letters and self.dead_letter_sink is not None:
            self.dead_letter_sink(result.dead_letters)

    def _claim(
        self,
        batch_id: str,
        source: Source,
        limit: int,
        fixed: TableName | None,
        known: dict[TableName, bool],
    ) -> Callable[[], Verdicts]:
        """Claim the identities of the events ``[0, limit)`` of tables with dedupe on; the
        verdicts come from the function returned.

        The reference path claims before it writes (it leaves repeats out as it projects). The
        compiled path claims in a thread while it writes its first chunk: the claim is Redis's
        work, mostly (a Lua script over every identity), and Parquet writing releases the GIL,
        so the two overlap; a batch with repeats (rare) is written again the reference way.
        """
        if isinstance(source, CompiledSource):
            on = any(self.settings.dedupe_for(str(name)) for name in source.names)
            if self.claims is None or not on or not limit:
                return Verdicts
            claiming = self._claim_pool().submit(
                claim_compiled, self.claims, self.settings, batch_id, source, limit
            )
            return claiming.result
        assert isinstance(source, ReferenceSource)
        events = source.parsed.events[:limit]
        tables = [fixed or self.router.table_for(e.attributes["type"]) for e in events]
        for name in set(tables) - set(known):
            known[name] = self.registry is not None and self.registry.is_known(str(name), batch_id)
        verdicts = claim_events(self.claims, self.settings, batch_id, events, tables, known)
        return lambda: verdicts

    def _lake(self, batch_id: str) -> Lake:
        registry = self.registry
        return Lake(
            self.settings,
            self.router.table_for,
            lambda name: self.catalog_retry.call(f"load table {name}", self.store.load, name),
            lambda name: registry is not None and registry.is_known(str(name), batch_id),
            lambda table: self.plans.for_table(table).arrow_schema,
        )

    def _must_stop(
        self, deadline: float | None, stop: Callable[[], bool] | None, next_chunk_s: float
    ) -> bool:
        """Stop before the next chunk if asked to, or if it would end after the deadline (a
        chunk is assumed to take as long as the last one did)."""
        if stop is not None and stop():
            return True
        return deadline is not None and self.clock() + next_chunk_s > deadline

    def write_events(
        self,
        batch_id: str,
        events: list[Event],
        bounds: tuple[int, int],
        *,
        whole: bool,
        fixed: TableName | None,
        ingested_at: datetime,
        known: dict[TableName, bool],
        attempt: str,
    ) -> Chunk:
        """Write the files of one chunk of events; register nothing yet."""
        chunk = Chunk(*bounds)
        groups: dict[TableName, list[Event]] = defaultdict(list)
        for event in events:
            groups[fixed or self.router.table_for(event.attributes["type"])].append(event)
        for name, table_events in groups.items():
            if name not in known:
                known[name] = self.registry is not None and self.registry.is_known(
                    str(name), batch_id
                )
            if known[name]:
                continue
            chunk.files[name], rejected = self._write_table(
                name, table_events, batch_id, ingested_at, attempt, None if whole else bounds
            )
            chunk.dead_letters.extend(rejected)
            if self.settings.dedupe_for(str(name)):  # their claims go back with them
                chunk.rejected.extend((name, letter.position) for letter in rejected)
        return chunk

    def _register(
        self,
        batch_id: str,
        chunks: list[Chunk],
        known: dict[TableName, bool],
        result: BatchResult,
    ) -> None:
        """Register, per table, the files of every chunk written, under the batch's id, with
        the repeats left out of it; a table whose events were all repeats registers an empty
        part (it counts them, and a redelivery then skips the table)."""
        result.skipped_tables.extend(str(name) for name, is_known in known.items() if is_known)
        by_table: dict[str, list[DataFile]] = defaultdict(list)
        for chunk in chunks:
            result.dead_letters.extend(chunk.dead_letters)
            for table_name, files in chunk.files.items():
                by_table[str(table_name)].extend(files)
        for name in sorted(set(by_table) | set(result.duplicates)):
            files = by_table.get(name, [])
            counts = result.duplicates.get(name, (0, 0))
            if not files and counts == (0, 0):
                continue
            entry = PendingEntry.of(batch_id, files).to_json() if files else ""
            if self.registry is not None and not self.registry.register(
                name, batch_id, entry, counts
            ):
                result.skipped_tables.append(name)
                continue
            if files:
                result.files[name] = files

    def _open(
        self, name: TableName, events: list[Event], mode: SchemaMode, batch_id: str
    ) -> tuple[Table | None, list[DeadLetter]]:
        """The table of ``events``, created from what the whole batch carries if new (strict
        tables too); or none and the events as dead letters: no route for their type, or a new
        table past the cap (common/write/table_limits.py)."""
        table = None
        if name != DEAD_LETTER_ROUTE:
            table = self.catalog_retry.call(f"load table {name}", self.store.load, name)
        if reason := refusal(name, events, table is not None, self.store.catalog, self.settings):
            return None, refused(batch_id, events, reason)
        if table is None:
            table = self._ensure(name, self._desired(mode, events))
        return table, []

    def _write_table(
        self,
        name: TableName,
        events: list[Event],
        batch_id: str,
        ingested_at: datetime,
        attempt: str,
        chunk: tuple[int, int] | None = None,
    ) -> tuple[list[DataFile], list[DeadLetter]]:
        mode = self.settings.mode_for(str(name))
        table, refusals = self._open(name, events, mode, batch_id)
        if table is None:
            return [], refusals
        by_day: dict[int | None, list[Event]] = defaultdict(list)
        for event in events:
            by_day[partition_day(event)].append(event)
        days = sorted(by_day, key=lambda day: (day is None, day or 0))
        writes = FileWrites(self._file_pool if len(days) > 1 else None)
        rejected: list[DeadLetter] = []

        def write(table: Table, day: int | None, projection: Projection) -> None:
            for event, reason in projection.rejected:
                rejected.append(
                    DeadLetter(batch_id, event.position, reason, "data", event.raw.encode())
                )
            self._start_file(writes, table, day, projection.table, batch_id, attempt, chunk)

        try:
            # A day's file is written while the next day is projected. Fast path: inference
            # runs only on the events that spilled a value (a key without a column, a value that
            # does not fit); in a stream whose schema is settled that is none. A day that spilled
            # waits for the table to evolve and is projected again; the days written before keep
            # the schema they were written with (their events had nothing the new columns take).
            held: dict[int | None, Projection] = {}
            for day in days:
                projection = self._project(table, by_day[day], batch_id, ingested_at, mode)
                if projection.spilled and mode == "evolve":
                    held[day] = projection
                else:
                    write(table, day, projection)
            if held:
                spilled = [e for projection in held.values() for e in projection.spilled]
                evolved = self._ensure(name, self._desired(mode, spilled))
                if evolved.metadata_location != table.metadata_location:
                    table = evolved
                    held = {
                        day: self._project(table, by_day[day], batch_id, ingested_at, mode)
                        for day in held
                    }
                for day, projection in held.items():
                    write(table, day, projection)
            files = writes.results()
        finally:
            writes.cancel()
        _log_written(batch_id, files, name)
        return files, rejected

    def write_rows(
        self,
        name: TableName,
        table: Table,
        by_day: dict[int | None, pa.Table],
        batch_id: str,
        attempt: str,
        chunk: tuple[int, int] | None,
    ) -> list[DataFile]:
        """Write rows already in ``table``'s layout, one file per day (the compiled path)."""
        writes = FileWrites(self._file_pool if len(by_day) > 1 else None)
        try:
            for day, rows in by_day.items():
                self._start_file(writes, table, day, rows, batch_id, attempt, chunk)
            files = writes.results()
        finally:
            writes.cancel()
        _log_written(batch_id, files, name)
        return files

    def _start_file(
        self,
        writes: FileWrites,
        table: Table,
        day: int | None,
        rows: pa.Table,
        batch_id: str,
        attempt: str,
        chunk: tuple[int, int] | None,
    ) -> None:
        if rows.num_rows == 0:
            return
        path = (
            data_file_path(table.location(), batch_id, day, attempt)
            if chunk is None
            else chunk_file_path(table.location(), batch_id, day, *chunk, attempt=attempt)
        )
        writes.start(
            day,
            functools.partial(
                self.storage_retry.call,
                f"write {path}",
                write_data_file,
                table,
                rows,
                path,
                Record(day),
                row_group_rows=self.settings.row_group_rows,
                compression=self.settings.compression,
                plan=self.plans.for_table(table),
                page_checksums=self.settings.page_checksums,
                objects=self.objects,
            ),
        )

    def _file_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:  # made on first use: in the worker process, after Celery forks
            self._pool = ThreadPoolExecutor(FILE_WRITE_THREADS, thread_name_prefix="icefleet-file")
        return self._pool

    def _claim_pool(self) -> ThreadPoolExecutor:
        if self._claimer is None:  # its own thread: a claim must not wait behind file writes
            self._claimer = ThreadPoolExecutor(1, thread_name_prefix="icefleet-claim")
        return self._claimer

    def _ensure(self, name: TableName, desired: Callable[[Table | None, Schema], Schema]) -> Table:
        """Create or evolve the table, retrying catalog hiccups (not a lock held elsewhere)."""
        policy = self.catalog_retry.but(retry_on=is_transient_unless_locked)
        return policy.call(f"create or evolve {name}", self.store.ensure, name, desired)

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
        events: list[Event],
        batch_id: str,
        ingested_at: datetime,
        mode: SchemaMode,
    ) -> Projection:
        return project(
            events,
            table.schema(),
            self.plans.for_table(table).arrow_schema,
            batch_id=batch_id,
            ingested_at=ingested_at,
            mode=mode,
            renamed=aliases(table.metadata.properties),
        )
