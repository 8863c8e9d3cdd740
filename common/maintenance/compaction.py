"""Compaction: many small data files of a partition rewritten into few target-size ones.

- **Plan** (:func:`plan_compaction`, no lock, metadata only): per partition of the current spec,
  the live files smaller than ``small_file_fraction`` times the target size are candidates; a
  partition with at least ``min_files`` of them is a :class:`CompactionGroup`. Large files are
  never touched. Partitions with delete files, files of an older spec, and pending files (in Redis)
  are left alone.
- **Rewrite** (no lock: data files are immutable): each group is cut, in order, into bins whose
  input bytes add up to at most the target (compressed input size is a good estimate of the
  output's); each bin is read through the table's FileIO (pyiceberg's ArrowScan, which projects
  older files onto the current schema by field id), and written as one Parquet file, zstd, with the
  table's field ids, described by its own footer (:func:`common.write.datafile_writer.write_data_file`). Output
  names are deterministic: ``data/<partition>/compacted-<uuid5 of the input paths>.parquet``.
- **Swap** (under the table lock): refresh, check that every input file is still live (else
  :class:`~common.errors.ConcurrentModificationError`, the outputs are deleted and the group is
  planned again), and commit ONE snapshot that deletes the inputs and adds the outputs, with the
  operation ``replace`` (no data changed: incremental readers skip it) and pyiceberg's retry off.
  A conflict with an outside append is checked and committed again with the same outputs.

Compaction is not a data commit: the snapshot carries no ``icefleet.commit-seq`` (the lineage
check wants that strictly increasing), only ``icefleet.base-commit-seq``, the watermark it was
based on, which :func:`common.commit.committer.committed_seq` leaves unchanged.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    ValidationException,
)
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan, schema_to_pyarrow
from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.table import FileScanTask, Table
from pyiceberg.table.snapshots import Operation, Summary
from pyiceberg.table.update.snapshot import _OverwriteFiles
from pyiceberg.typedef import EMPTY_DICT, Record

from common.commit.committer import committed_seq, without_library_retries
from common.errors import (
    CommitStateUnknownError,
    ConcurrentModificationError,
    LockError,
    RetriesExhaustedError,
)
from common.maintenance.deletes import live_data_files
from common.maintenance.orphans import canonical_path, delete_files

logger = logging.getLogger(__name__)

BASE_SEQ_PROPERTY = "icefleet.base-commit-seq"
SWAP_ATTEMPTS = 5
REWRITE_THREADS = 2  # bins rewritten at once: each holds about a target size of rows in memory
_NAMESPACE = uuid.UUID("6f1f3c1e-7d1a-4a8e-9b1e-1cef1ee7c0a1")


@dataclass(frozen=True)
class CompactionOptions:
    """What counts as small and how big outputs get. ``max_rewrite_bytes`` caps one run."""

    target_file_size_bytes: int = 134_217_728
    small_file_fraction: float = 0.75
    min_files: int = 5
    max_rewrite_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.target_file_size_bytes <= 0:
            raise ValueError("target_file_size_bytes must be positive")
        if not 0 < self.small_file_fraction <= 1:
            raise ValueError("small_file_fraction must be in (0, 1]")
        if self.min_files < 2:
            raise ValueError("min_files must be at least 2")

    @property
    def small_file_bytes(self) -> int:
        return int(self.target_file_size_bytes * self.small_file_fraction)


@dataclass(frozen=True)
class CompactionGroup:
    """The small files of one partition, to be rewritten together."""

    spec_id: int
    partition: Record
    files: tuple[DataFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.file_size_in_bytes for f in self.files)

    @property
    def records(self) -> int:
        return sum(f.record_count for f in self.files)


@dataclass(frozen=True)
class CompactionPlan:
    """The groups to compact in one table, planned on snapshot ``snapshot_id``."""

    table: str
    snapshot_id: int | None
    options: CompactionOptions
    groups: tuple[CompactionGroup, ...]
    more: bool = False  # groups left out by max_rewrite_bytes

    @property
    def files(self) -> int:
        return sum(len(g.files) for g in self.groups)

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    def __bool__(self) -> bool:
        return bool(self.groups)


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


def _partition_key(data_file: DataFile) -> tuple[int, tuple[object, ...]]:
    partition = data_file.partition
    return data_file.spec_id, tuple(partition[i] for i in range(len(partition)))


def plan_files(
    files: Iterable[DataFile],
    options: CompactionOptions,
    *,
    spec_id: int | None = None,
    exclude: Collection[str] = (),
    skip_partitions: Collection[tuple[int, tuple[object, ...]]] = (),
) -> list[CompactionGroup]:
    """The compaction groups among ``files`` (pure: plans on DataFile sizes only).

    Only data files of ``spec_id`` (when given), not in ``exclude`` (canonical paths) and not in
    ``skip_partitions`` are considered. Groups come out in partition order, files in path order.
    """
    small: dict[tuple[int, tuple[object, ...]], list[DataFile]] = defaultdict(list)
    for data_file in files:
        if data_file.content != DataFileContent.DATA:
            continue
        if spec_id is not None and data_file.spec_id != spec_id:
            continue
        if data_file.file_size_in_bytes >= options.small_file_bytes:
            continue
        key = _partition_key(data_file)
        if key in skip_partitions or canonical_path(data_file.file_path) in exclude:
            continue
        small[key].append(data_file)
    groups = []
    for key in sorted(small, key=lambda k: (k[0], tuple((v is None, str(v)) for v in k[1]))):
        members = sorted(small[key], key=lambda f: f.file_path)
        if len(members) >= options.min_files:
            groups.append(CompactionGroup(key[0], members[0].partition, tuple(members)))
    return groups


def plan_compaction(
    table: Table, options: CompactionOptions, *, exclude: Collection[str] = ()
) -> CompactionPlan:
    """The compaction plan of ``table``'s current snapshot (reads manifests, no data file)."""
    name = ".".join(table.name())
    snapshot = table.current_snapshot()
    if snapshot is None:
        return CompactionPlan(name, None, options, ())
    files: list[DataFile] = []
    with_deletes: set[tuple[int, tuple[object, ...]]] = set()
    for manifest in snapshot.manifests(table.io):
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            if entry.data_file.content == DataFileContent.DATA:
                files.append(entry.data_file)
            else:  # rows deleted by delete files: rewriting would need to apply them; leave be
                with_deletes.add(_partition_key(entry.data_file))
    groups = plan_files(
        files,
        options,
        spec_id=table.metadata.default_spec_id,
        exclude=exclude,
        skip_partitions=with_deletes,
    )
    more = False
    if options.max_rewrite_bytes is not None:
        kept: list[CompactionGroup] = []
        total = 0
        for group in groups:
            if kept and total + group.bytes > options.max_rewrite_bytes:
                more = True
                break
            kept.append(group)
            total += group.bytes
        groups = kept
    return CompactionPlan(name, snapshot.snapshot_id, options, tuple(groups), more)


def bins(files: Iterable[DataFile], target_file_size_bytes: int) -> list[list[DataFile]]:
    """Consecutive runs of ``files`` whose sizes add up to at most the target; a run of one file
    is dropped (rewriting one file alone gains nothing)."""
    out: list[list[DataFile]] = []
    current: list[DataFile] = []
    size = 0
    for data_file in files:
        if current and size + data_file.file_size_in_bytes > target_file_size_bytes:
            out.append(current)
            current, size = [], 0
        current.append(data_file)
        size += data_file.file_size_in_bytes
    if current:
        out.append(current)
    return [b for b in out if len(b) > 1]


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
) -> DataFile:
    """Read ``inputs`` (projected onto the current schema) and write them as one data file."""
    from common.write.datafile_writer import write_data_file

    schema = table.schema()
    scan = ArrowScan(table.metadata, table.io, schema, AlwaysTrue())
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
    )
    written.spec_id = group.spec_id
    return written


def rewrite_plan(
    table: Table, plan: CompactionPlan, *, row_group_rows: int, compression: str = "zstd"
) -> tuple[list[DataFile], list[DataFile]]:
    """Write the outputs of every bin of ``plan``; (inputs replaced, outputs written)."""
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
            table, group, inputs, row_group_rows=row_group_rows, compression=compression
        )

    with ThreadPoolExecutor(min(REWRITE_THREADS, len(work))) as pool:
        outputs = list(pool.map(rewrite, work))
    return [f for _, inputs in work for f in inputs], outputs


def compact_table(
    table: Table,
    options: CompactionOptions,
    *,
    lock: AbstractContextManager[object] | None = None,
    exclude: Collection[str] = (),
    row_group_rows: int = 100_000,
    compression: str = "zstd",
    attempts: int = 3,
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
            table, plan, row_group_rows=row_group_rows, compression=compression
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


class _ReplaceFiles(_OverwriteFiles):
    """pyiceberg's overwrite producer, recording the snapshot as a ``replace``.

    pyiceberg 0.12 has no replace API and its summary code accepts only append, overwrite and
    delete; the totals are the same for a replace, so they are computed as for an overwrite and
    the operation is set afterwards. Its concurrency checks already treat ``replace`` as Java does.
    """

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        summary = super()._summary(snapshot_properties)
        return Summary(Operation.REPLACE, **summary.additional_properties)


def swap_data_files(
    table: Table,
    old: Collection[DataFile],
    new: Collection[DataFile],
    *,
    snapshot_properties: dict[str, str] | None = None,
    check: Callable[[], None] | None = None,
    attempts: int = SWAP_ATTEMPTS,
) -> Table:
    """Replace the data files ``old`` by ``new`` in ONE ``replace`` snapshot; the table after.

    Right before each attempt the table is refreshed and every old file must still be live, else
    :class:`ConcurrentModificationError` (nothing committed). ``check`` (e.g.
    :meth:`~common.coord.locks.TableLock.check`) runs right before each commit. The snapshot carries
    the commit watermark it was based on as ``icefleet.base-commit-seq``; the watermark itself
    is unchanged.
    """
    name = ".".join(table.name())
    for attempt in range(1, attempts + 1):
        table = table.refresh()
        live = live_data_files(table)
        gone = sorted(f.file_path for f in old if f.file_path not in live)
        if gone:
            raise ConcurrentModificationError(name, gone)
        base_seq = committed_seq(table)
        props = {**(snapshot_properties or {}), BASE_SEQ_PROPERTY: str(base_seq)}
        tx = without_library_retries(table).transaction()
        with _ReplaceFiles(
            operation=Operation.OVERWRITE, transaction=tx, io=table.io, snapshot_properties=props
        ) as replace:
            for data_file in old:
                replace.delete_data_file(live[data_file.file_path])
            for data_file in new:
                replace.append_data_file(data_file)
        if check is not None:
            check()
        try:
            committed = tx.commit_transaction()
        except ValidationException as exc:
            raise ConcurrentModificationError(name, sorted(f.file_path for f in old)) from exc
        except CommitFailedException as exc:
            logger.info("%s: swap conflicted (attempt %d): %s", name, attempt, exc)
            if attempt == attempts:
                raise RetriesExhaustedError(f"swap of files in {name}", attempt, exc) from exc
            continue
        except CommitStateUnknownException as exc:
            raise CommitStateUnknownError(name, str(exc)) from exc
        if committed_seq(committed) != base_seq:  # pragma: no cover - a broken invariant
            logger.error("%s: the commit watermark moved across a swap", name)
        return committed
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
    "CompactionGroup",
    "CompactionOptions",
    "CompactionPlan",
    "CompactionResult",
    "bins",
    "compact_table",
    "plan_compaction",
    "plan_files",
    "rewrite_bin",
    "rewrite_plan",
    "swap_data_files",
]
