"""Do a data file's rows agree with the column statistics its manifest entry claims?

Readers trust the manifest's bounds to skip files (``WHERE time >= ...`` never opens a file whose
upper bound is earlier), so a bound tighter than the data makes rows silently vanish from filtered
scans, and wrong null or value counts mislead planners. Here the statistics are computed again
from the rows as read (every page checked), the way pyiceberg computes them when it writes: the
decoded row groups are re-encoded into a discarding sink (:class:`pyarrow.MockOutputStream`, one
row group in memory at a time) and the sink's footer statistics go through pyiceberg's own
``data_file_statistics_from_parquet_metadata`` with the file's schema (field ids from the file)
and the table's metrics properties (string truncation alike).

The comparison: value, null and NaN counts equal; the manifest's lower bound at most the data's
and its upper bound at least the data's (bounds may be looser, e.g. truncated by another writer
with other metrics settings, but never tighter). Fields present on one side only are not judged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.conversions import from_bytes
from pyiceberg.io.pyarrow import (
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
    pyarrow_to_schema,
)
from pyiceberg.manifest import DataFile
from pyiceberg.schema import Schema
from pyiceberg.types import PrimitiveType

_COUNTS = (
    ("value_counts", "value count"),
    ("null_value_counts", "null count"),
    ("nan_value_counts", "NaN count"),
)


class StatisticsSink:
    """Re-encodes row groups into nothing, keeping only the footer statistics."""

    def __init__(self) -> None:
        self._writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None

    def add(self, rows: pa.Table) -> None:
        if self._writer is None:
            self.schema = rows.schema
            self._writer = pq.ParquetWriter(
                pa.MockOutputStream(),
                rows.schema,
                compression=None,
                use_dictionary=False,
                write_statistics=True,
            )
        self._writer.write_table(rows)

    def close(self) -> pq.FileMetaData | None:
        if self._writer is None:
            return None
        self._writer.close()
        metadata: pq.FileMetaData = self._writer.writer.metadata
        return metadata


def recomputed(
    schema: pa.Schema, metadata: pq.FileMetaData, properties: dict[str, str], name_mapping: Any
) -> tuple[Schema, dict[str, Any]]:
    """The file's Iceberg schema and the statistics pyiceberg would record for ``metadata``."""
    file_schema = pyarrow_to_schema(
        schema, name_mapping=name_mapping, downcast_ns_timestamp_to_us=True
    )
    stats = data_file_statistics_from_parquet_metadata(
        parquet_metadata=metadata,
        stats_columns=compute_statistics_plan(file_schema, properties),
        parquet_column_mapping=parquet_path_to_id_mapping(file_schema),
    )
    return file_schema, stats.to_serialized_dict()


def compare(manifest: DataFile, data: dict[str, Any], schema: Schema) -> list[str]:
    """What the manifest entry claims that the data contradicts, as sentences."""
    problems = []
    for attribute, label in _COUNTS:
        claimed = getattr(manifest, attribute) or {}
        actual = data.get(attribute) or {}
        for field_id in _shared(claimed, actual):
            if claimed[field_id] != actual[field_id]:
                problems.append(
                    f"column {_name(schema, field_id)}: {label} {claimed[field_id]} in the "
                    f"manifest, {actual[field_id]} in the data"
                )
    for attribute, too_tight, word in (
        ("lower_bounds", lambda m, d: m > d, "above the data's minimum"),
        ("upper_bounds", lambda m, d: m < d, "below the data's maximum"),
    ):
        claimed = getattr(manifest, attribute) or {}
        actual = data.get(attribute) or {}
        for field_id in _shared(claimed, actual):
            kind = schema.find_type(field_id)
            if not isinstance(kind, PrimitiveType):
                continue
            mine, theirs = from_bytes(kind, claimed[field_id]), from_bytes(kind, actual[field_id])
            if too_tight(mine, theirs):
                problems.append(
                    f"column {_name(schema, field_id)}: the manifest's "
                    f"{attribute.split('_')[0]} bound {mine!r} is {word} {theirs!r}"
                )
    return problems


def _shared(a: dict[int, Any], b: dict[int, Any]) -> Iterable[int]:
    return sorted(a.keys() & b.keys())


def _name(schema: Schema, field_id: int) -> str:
    return schema.find_column_name(field_id) or f"#{field_id}"


__all__ = ["StatisticsSink", "compare", "recomputed"]
