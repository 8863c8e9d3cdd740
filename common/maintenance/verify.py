"""``icefleet verify``: does every file the current snapshot needs exist, whole?

For the current snapshot: the manifest list and every manifest can be read, and every live data or
delete file exists with the size its manifest entry says, and (Parquet) its footer's row count
equals the entry's ``record_count``. Only footers are read, in parallel through the table's
FileIO, so a table of thousands of files verifies in seconds. Problems come back as sentences.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq
from pyiceberg.manifest import DataFile, FileFormat
from pyiceberg.table import Table

from common.lake.storage import file_size

logger = logging.getLogger(__name__)

VERIFY_THREADS = 16


@dataclass
class VerifyReport:
    """The verdict on one table."""

    table: str
    snapshot_id: int | None = None
    files: int = 0
    bytes: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


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


def verify_table(table: Table) -> VerifyReport:
    """Check every file the current snapshot of ``table`` needs."""
    report = VerifyReport(".".join(table.name()))
    snapshot = table.current_snapshot()
    if snapshot is None:
        return report
    report.snapshot_id = snapshot.snapshot_id
    try:
        manifests = snapshot.manifests(table.io)
    except Exception as exc:
        report.problems.append(f"manifest list {snapshot.manifest_list}: unreadable: {exc}")
        return report
    files: list[DataFile] = []
    for manifest in manifests:
        try:
            entries = manifest.fetch_manifest_entry(table.io, discard_deleted=True)
        except Exception as exc:
            report.problems.append(f"manifest {manifest.manifest_path}: unreadable: {exc}")
            continue
        files.extend(entry.data_file for entry in entries)
    report.files = len(files)
    report.bytes = sum(f.file_size_in_bytes for f in files)
    report.records = sum(f.record_count for f in files)
    if files:
        with ThreadPoolExecutor(min(VERIFY_THREADS, len(files))) as pool:
            for problem in pool.map(lambda f: check_file(table, f), files):
                if problem is not None:
                    report.problems.append(problem)
    logger.info(
        "%s: verified %d file(s), %d problem(s)", report.table, len(files), len(report.problems)
    )
    return report


__all__ = ["VerifyReport", "check_file", "verify_table"]
