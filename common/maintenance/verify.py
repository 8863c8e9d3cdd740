"""``icefleet verify``: does every file the current snapshot needs exist, whole, and say the truth?

For the current snapshot: the manifest list and every manifest can be read, and every live data or
delete file exists with the size its manifest entry says, and (Parquet) its footer's row count
equals the entry's ``record_count``. Only footers are read, in parallel through the table's
FileIO, so a table of thousands of files verifies in seconds. Problems come back as sentences,
each starting with the file's path.

``deep`` (``icefleet verify --deep``) reads every page of every live Parquet data file with its
CRC checked (:mod:`common.lake.integrity`), counts the rows, and checks the manifest entry's
column statistics against the rows (:mod:`common.maintenance.stats_check`). A file written
without page checksums is read all the same and noted: a changed byte in it can only be found
when it does not decode. ``only`` restricts the check to some files (the sampled validation of
:mod:`common.maintenance.sampling`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.table import Table

from common.errors import CorruptDataFileError
from common.lake.integrity import (
    has_page_checksums,
    open_verified,
    read_object,
    verified_row_groups,
    verify_parquet,
)
from common.lake.storage import file_size
from common.maintenance.stats_check import StatisticsSink, compare, recomputed

logger = logging.getLogger(__name__)

VERIFY_THREADS = 16
DEEP_THREADS = 4  # deep checks decode every page: CPU-bound (pyarrow releases the GIL)


@dataclass
class VerifyReport:
    """The verdict on one table."""

    table: str
    snapshot_id: int | None = None
    files: int = 0
    bytes: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)
    deep: bool = False
    checked: int = 0  # files checked (all live files unless ``only`` chose some)
    bad_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class FileVerdict:
    """What is wrong with one file (sentences starting with its path), and what is notable."""

    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_file(table: Table, data_file: DataFile) -> str | None:
    """What is wrong with one live file, or None."""
    path = data_file.file_path
    try:
        size = file_size(table.io, path)
    except OSError as exc:
        return f"{path}: cannot be read: {exc}"
    if size is None:
        return f"{path}: missing (the manifest says {data_file.file_size_in_bytes} bytes)"
    if size != data_file.file_size_in_bytes:
        return f"{path}: {size} bytes, the manifest says {data_file.file_size_in_bytes}"
    if data_file.file_format != FileFormat.PARQUET:
        return None
    try:
        with table.io.new_input(path).open() as stream:
            rows = pq.ParquetFile(stream).metadata.num_rows
    except Exception as exc:  # a corrupt footer shows up as any of pyarrow's errors
        return f"{path}: unreadable Parquet footer: {type(exc).__name__}: {exc}"
    if rows != data_file.record_count:
        return f"{path}: the footer says {rows} rows, the manifest says {data_file.record_count}"
    return None


def deep_check_file(table: Table, data_file: DataFile) -> FileVerdict:
    """Every page of ``data_file`` read with its CRC checked; rows and statistics against the
    manifest entry."""
    path = data_file.file_path
    shallow = check_file(table, data_file)
    if shallow is not None or data_file.file_format != FileFormat.PARQUET:
        return FileVerdict(path, [shallow] if shallow else [])
    try:
        data = read_object(table.io, path)
        parquet = open_verified(data, path)
    except (OSError, CorruptDataFileError) as exc:
        return FileVerdict(path, [f"{path}: cannot be read: {exc}"])
    notes = []
    if not has_page_checksums(data, parquet.metadata):
        notes.append(
            f"{path}: written without page checksums (a changed byte is found only "
            "if it does not decode)"
        )
    if data_file.content != DataFileContent.DATA:
        rows = _pages_only(data, path)
        return FileVerdict(path, [rows] if isinstance(rows, str) else [], notes)
    sink = StatisticsSink()
    rows = 0
    try:
        for row_group in verified_row_groups(data, path):
            sink.add(row_group)
            rows += row_group.num_rows
    except CorruptDataFileError as exc:
        return FileVerdict(path, [f"{path}: {exc.detail}"], notes)
    finally:
        metadata = sink.close()
    problems = []
    if rows != data_file.record_count:
        problems.append(f"{path}: {rows} rows read, the manifest says {data_file.record_count}")
    if metadata is not None and sink.schema is not None:
        try:
            schema, stats = recomputed(
                sink.schema, metadata, table.metadata.properties, table.metadata.name_mapping()
            )
        except Exception as exc:  # no field ids and no name mapping: nothing to compare by
            notes.append(f"{path}: statistics not checked: {type(exc).__name__}: {exc}")
        else:
            problems += [f"{path}: {problem}" for problem in compare(data_file, stats, schema)]
    return FileVerdict(path, problems, notes)


def _pages_only(data: Any, path: str) -> int | str:
    try:
        return verify_parquet(data, path)
    except CorruptDataFileError as exc:
        return f"{path}: {exc.detail}"


def live_files(table: Table, report: VerifyReport) -> list[DataFile]:
    """The live files of the current snapshot (unreadable manifests go to ``report``)."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return []
    report.snapshot_id = snapshot.snapshot_id
    try:
        manifests = snapshot.manifests(table.io)
    except Exception as exc:
        report.problems.append(f"manifest list {snapshot.manifest_list}: unreadable: {exc}")
        return []
    files: list[DataFile] = []
    for manifest in manifests:
        try:
            entries = manifest.fetch_manifest_entry(table.io, discard_deleted=True)
        except Exception as exc:
            report.problems.append(f"manifest {manifest.manifest_path}: unreadable: {exc}")
            continue
        files.extend(entry.data_file for entry in entries)
    return files


def verify_table(
    table: Table,
    *,
    deep: bool = False,
    only: Collection[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every file the current snapshot of ``table`` needs (or those of them in ``only``);
    ``progress(n)`` is called with the number of files to check, then with 1 per file done."""
    report = VerifyReport(".".join(table.name()), deep=deep)
    files = live_files(table, report)
    report.files = len(files)
    report.bytes = sum(f.file_size_in_bytes for f in files)
    report.records = sum(f.record_count for f in files)
    chosen = files if only is None else [f for f in files if f.file_path in only]
    report.checked = len(chosen)
    if progress is not None:
        progress(len(chosen))
    if chosen:
        threads = DEEP_THREADS if deep else VERIFY_THREADS
        check = deep_check_file if deep else _shallow
        with ThreadPoolExecutor(min(threads, len(chosen))) as pool:
            for verdict in pool.map(lambda f: check(table, f), chosen):
                report.problems += verdict.problems
                report.notes += verdict.notes
                if verdict.problems:
                    report.bad_files.append(verdict.path)
                if progress is not None:
                    progress(1)
    logger.info(
        "%s: verified %d file(s)%s, %d problem(s)",
        report.table,
        report.checked,
        " deeply" if deep else "",
        len(report.problems),
    )
    return report


def _shallow(table: Table, data_file: DataFile) -> FileVerdict:
    problem = check_file(table, data_file)
    return FileVerdict(data_file.file_path, [problem] if problem else [])


__all__ = [
    "FileVerdict",
    "VerifyReport",
    "check_file",
    "deep_check_file",
    "live_files",
    "verify_table",
]
