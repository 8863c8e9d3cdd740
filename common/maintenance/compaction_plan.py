"""Compaction planning: which small files of which partitions to rewrite, and in which bins.

Pure metadata: :func:`plan_compaction` reads the current snapshot's manifests, never a data file,
and takes no lock (:mod:`common.maintenance.compaction` rewrites and swaps what it plans). Per
partition of the current spec, the live files smaller than ``small_file_fraction`` times the
target size are candidates; a partition with at least ``min_files`` of them is a
:class:`CompactionGroup`. Large files are never touched. Partitions with delete files, files of
an older spec, and pending files (in Redis) are left alone. :func:`bins` cuts a group, in order,
into runs whose input bytes add up to at most the target (compressed input size is a good
estimate of the output's).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.table import Table
from pyiceberg.typedef import Record

from common.maintenance.orphans import canonical_path


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


__all__ = [
    "CompactionGroup",
    "CompactionOptions",
    "CompactionPlan",
    "bins",
    "plan_compaction",
    "plan_files",
]
