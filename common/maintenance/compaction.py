"""Compaction: many small data files of a partition rewritten into few target-size ones.

:func:`compact_table` runs the three steps, and plans again if an input was removed meanwhile:

- **Plan** (:mod:`common.maintenance.compaction_plan`, no lock, metadata only): per partition,
  the small live files, cut into bins of about the target size; large files, partitions with
  delete files, files of an older spec and pending files (in Redis) are left alone.
- **Rewrite** (here, no lock: data files are immutable): each bin is read through the table's
  FileIO (pyiceberg's ArrowScan, which projects older files onto the current schema by field
  id), every page of every input checked against its CRC first (:mod:`common.lake.integrity`: a
  corrupt input fails the run, loudly, and is never copied), and written as one Parquet file,
  zstd, page checksums on, with the table's field ids, described by its own footer
  (:func:`common.write.datafile_writer.write_data_file`). Output names are deterministic:
  ``data/<partition>/compacted-<uuid5 of the input paths>.parquet``.
- **Swap** (:mod:`common.maintenance.swap`, under the table lock): ONE ``replace`` snapshot that
  deletes the inputs and adds the outputs, if every input is still live; else
  :class:`~common.errors.ConcurrentModificationError`, and the outputs are deleted here.

Compaction is not a data commit: the snapshot carries no ``icefleet.commit-seq`` (the lineage
check wants that strictly increasing), only ``icefleet.base-commit-seq``, the watermark it was
based on, which :func:`common.commit.committer.committed_seq` leaves unchanged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan, schema_to_pyarrow
from pyiceberg.manifest import DataFile
from pyiceberg.table import FileScanTask, Table

from common.errors import ConcurrentModificationError, LockError, RetriesExhaustedError
from common.lake.integrity import VerifiedFileIO
from common.lake.uploads import ObjectWriter
from common.maintenance.compaction_plan import (
    CompactionGroup,
    CompactionOptions,
    CompactionPlan,
    bins,
    plan_compaction,
)
from common.maintenance.deletes import live_data_files
from common.maintenance.orphans import delete_files
from common.maintenance.swap import swap_data_files

logger = logging.getLogger(__name__)

REWRITE_THREADS = 2  # bins rewritten at once: each holds about a target size of rows in memory
_NAMESPACE = uuid.UUID("6f1f3c1e-7d1a-4a8e-9b1e-1cef1ee7c0a1")


@dataclass
class CompactionResult:
    """What one compaction run did to one table."""

    table: str
    groups: int = 0
    files_before: int = 0
    files_after: int = 0
    rewritten_files: int = 0
    written_files: int = 0
    rewritten_bytes: int = 0
    records: int = 0
    snapshot_id: int | None = None
    attempts: int = 0
    more: bool = False
    outputs: list[str] = field(default_factory=list)


def output_path(table: Table, group: CompactionGroup, inputs: list[DataFile]) -> str:
    """``<location>/data/<partition path>/compacted-<uuid>.parquet``, the uuid derived from the
    input paths: rewriting the same inputs again writes the same object."""
    key = uuid.uuid5(_NAMESPACE, "\n".join(sorted(f.file_path for f in inputs)))
    spec = table.metadata.specs()[group.spec_id]
    partition = spec.partition_to_path(group.partition, table.schema()) if spec.fields else ""
    folder = f"{table.location().rstrip('/')}/data" + (f"/{partition}" if partition else "")
    return f"{folder}/compacted-{key}.parquet"


def rewrite_bin(
    table: Table,
    group: CompactionGroup,
    inputs: list[DataFile],
    *,
    row_group_rows: int,
    compression: str = "zstd",
    objects: ObjectWriter | None = None,
) -> DataFile:
    """Read ``inputs`` (projected onto the current schema) and write them as one data file.

    Every page of every input is checked against its CRC first (:class:`VerifiedFileIO`): a
    corrupt input raises :class:`~common.errors.CorruptDataFileError` naming it, and nothing of
    it is copied into the output.
    """
    from common.write.datafile_writer import write_data_file

    schema = table.schema()
    scan = ArrowScan(table.metadata, VerifiedFileIO(table.io), schema, AlwaysTrue())
    rows = scan.to_table([FileScanTask(f) for f in inputs])
    expected = sum(f.record_count for f in inputs)
    if rows.num_rows != expected:
        raise ValueError(f"read {rows.num_rows} rows from files whose manifests say {expected}")
    rows = rows.cast(schema_to_pyarrow(schema))  # the table's field ids on every column
    written = write_data_file(
        table,
        rows,
        output_path(table, group, inputs),
        group.partition,
        row_group_rows=row_group_rows,
        compression=compression,
        dictionary=True,  # long-lived files: a few % smaller (see write_data_file)
        objects=objects or ObjectWriter(),
    )
    written.spec_id = group.spec_id
    return written


def rewrite_plan(
    table: Table,
    plan: CompactionPlan,
    *,
    row_group_rows: int,
    compression: str = "zstd",
    objects: ObjectWriter | None = None,
) -> tuple[list[DataFile], list[DataFile]]:
    """Write the outputs of every bin of ``plan``; (inputs replaced, outputs written).

    If a bin fails (a corrupt input, storage errors), the outputs of the others are deleted
    (nothing references them yet) and the error is raised: the run commits nothing.
    """
    work = [
        (group, inputs)
        for group in plan.groups
        for inputs in bins(group.files, plan.options.target_file_size_bytes)
    ]
    if not work:
        return [], []

    def rewrite(item: tuple[CompactionGroup, list[DataFile]]) -> DataFile:
        group, inputs = item
        return rewrite_bin(
            table,
            group,
            inputs,
            row_group_rows=row_group_rows,
            compression=compression,
            objects=objects,
        )

    with ThreadPoolExecutor(min(REWRITE_THREADS, len(work))) as pool:
        futures = [pool.submit(rewrite, item) for item in work]
        wait(futures)
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        written = [f.result().file_path for f in futures if f.exception() is None]
        delete_files(table.io, written)
        raise failed[0]  # type: ignore[misc]
    return [f for _, inputs in work for f in inputs], [f.result() for f in futures]


def compact_table(
    table: Table,
    options: CompactionOptions,
    *,
    lock: AbstractContextManager[object] | None = None,
    exclude: Collection[str] = (),
    row_group_rows: int = 100_000,
    compression: str = "zstd",
    attempts: int = 3,
    objects: ObjectWriter | None = None,
) -> CompactionResult:
    """Plan, rewrite and swap in one snapshot; plan again if an input was removed meanwhile.

    ``lock`` (a :class:`~common.coord.locks.TableLock`, not yet acquired) is held for the swap only;
    ``exclude`` are canonical paths never to compact (pending files).
    """
    name = ".".join(table.name())
    result = CompactionResult(name)
    for attempt in range(1, attempts + 1):
        result.attempts = attempt
        table = table.refresh()
        plan = plan_compaction(table, options, exclude=exclude)
        result.more = plan.more
        inputs, outputs = rewrite_plan(
            table, plan, row_group_rows=row_group_rows, compression=compression, objects=objects
        )
        result.files_before = int(_summary(table, "total-data-files"))
        if not inputs:
            result.files_after = result.files_before
            return result
        try:
            with lock if lock is not None else nullcontext():
                committed = swap_data_files(
                    table,
                    inputs,
                    outputs,
                    snapshot_properties={"icefleet.operation": "compact"},
                    check=getattr(lock, "check", None),
                )
        except ConcurrentModificationError as exc:
            _delete_unused(table, outputs)
            logger.warning("%s: compaction inputs changed (attempt %d): %s", name, attempt, exc)
            if attempt == attempts:
                raise
            continue
        except (RetriesExhaustedError, LockError):
            # Every commit attempt failed for sure, or none was made (lock not had, or lost
            # before the commit). A lock lost only at release follows a commit that landed:
            # _delete_unused keeps whatever is live.
            _delete_unused(table, outputs)
            raise
        snapshot = committed.current_snapshot()
        result.snapshot_id = snapshot.snapshot_id if snapshot else None
        result.groups = len(plan.groups)
        result.rewritten_files = len(inputs)
        result.written_files = len(outputs)
        result.rewritten_bytes = sum(f.file_size_in_bytes for f in inputs)
        result.records = sum(f.record_count for f in outputs)
        result.files_after = int(_summary(committed, "total-data-files"))
        result.outputs = [f.file_path for f in outputs]
        logger.info(
            "%s: compacted %d file(s) (%d bytes, %d rows) into %d in %d partition(s)",
            name,
            result.rewritten_files,
            result.rewritten_bytes,
            result.records,
            result.written_files,
            result.groups,
        )
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _delete_unused(table: Table, outputs: list[DataFile]) -> None:
    """Delete the outputs of a swap that did not land; never one that is live."""
    live = live_data_files(table.refresh())
    delete_files(table.io, [f.file_path for f in outputs if f.file_path not in live])


def _summary(table: Table, key: str) -> str:
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return "0"
    return snapshot.summary.additional_properties.get(key, "0")


__all__ = [
    "CompactionResult",
    "compact_table",
    "output_path",
    "rewrite_bin",
    "rewrite_plan",
]
