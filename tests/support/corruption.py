"""Damage a committed Parquet file the way storage does: one byte changed inside a data page.

The byte is chosen so that a reader that does not check page checksums reads the file without
any error and gets other values (the worst case; about half of the positions of a zstd page
behave so, the others fail to decompress): whoever catches it, catches it by the CRC.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _silently_wrong(data: bytes, original: pa.Table) -> bool:
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except Exception:
        return False
    return not table.equals(original)


def flip_byte_in_data_page(path: Path, column: str = "raw_event", row_group: int = 0) -> int:
    """Change one byte of ``column``'s first data page in ``path`` (in place); its offset."""
    data = path.read_bytes()
    parquet = pq.ParquetFile(pa.BufferReader(data))
    original = parquet.read()
    names = [
        parquet.metadata.row_group(row_group).column(i).path_in_schema
        for i in range(parquet.metadata.num_columns)
    ]
    chunk = parquet.metadata.row_group(row_group).column(names.index(column))
    start = chunk.data_page_offset
    end = start + chunk.total_compressed_size - (start - (chunk.dictionary_page_offset or start))
    # past the page header (a few dozen bytes), inside the page's (compressed) values
    for offset in range(start + (end - start) // 3, end):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        if _silently_wrong(bytes(damaged), original):
            path.write_bytes(bytes(damaged))
            return offset
    raise AssertionError(f"no byte of {column}'s page in {path} reads back silently wrong")
