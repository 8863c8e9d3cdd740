"""Checks on the bytes in the warehouse, through the table's own FileIO (file://, s3://).

Each lookup is retried on transient storage errors (throttling, 5xx, timeouts: common/lake/retry.py);
an absent object is an answer, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from pyiceberg.io import FileIO
from pyiceberg.manifest import DataFile

from common.errors import MissingDataFileError
from common.lake.retry import STORAGE

# HEAD requests to object storage are latency-bound: a few dozen in flight hide most of it.
CHECK_THREADS = 32


def file_size(io: FileIO, path: str) -> int | None:
    """The size of the object at ``path``, or None if it does not exist."""

    def size() -> int | None:
        try:
            return len(io.new_input(path))
        except FileNotFoundError:
            return None

    return STORAGE.call(f"size of {path}", size)


def check_data_files(io: FileIO, files: Sequence[DataFile]) -> list[MissingDataFileError]:
    """Every file that is absent or not the size its DataFile claims, as an error each."""

    def check(data_file: DataFile) -> MissingDataFileError | None:
        size = file_size(io, data_file.file_path)
        if size == data_file.file_size_in_bytes:
            return None
        return MissingDataFileError(data_file.file_path, data_file.file_size_in_bytes, size)

    if len(files) <= 4:
        results = [check(f) for f in files]
    else:
        with ThreadPoolExecutor(min(CHECK_THREADS, len(files))) as pool:
            results = list(pool.map(check, files))
    return [r for r in results if r is not None]
