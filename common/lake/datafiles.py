"""Iceberg ``DataFile`` descriptions as JSON, to travel from a writer through Redis to the committer.

The writer builds each DataFile from the footer of the Parquet file it just wrote; re-reading
footers in the committer would cost about a millisecond per file, which the group commit of
thousands of files cannot afford. The JSON form is lossless: bounds are base64 bytes, map keys
are field ids, partition values keep their types (a ``day`` partition is an int, null stays null).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.typedef import Record

FORMAT_VERSION = 1  # of this JSON layout, so a future change can be told apart

_INT_MAPS = ("column_sizes", "value_counts", "null_value_counts", "nan_value_counts")
_BYTES_MAPS = ("lower_bounds", "upper_bounds")


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def data_file_to_dict(data_file: DataFile) -> dict[str, Any]:
    """A JSON-ready dict with every field of ``data_file``."""
    out: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "content": int(data_file.content),
        "file_path": data_file.file_path,
        "file_format": str(data_file.file_format.value),
        "partition": [data_file.partition[i] for i in range(len(data_file.partition))],
        "record_count": data_file.record_count,
        "file_size_in_bytes": data_file.file_size_in_bytes,
        "spec_id": data_file.spec_id,
        "sort_order_id": data_file.sort_order_id,
        "split_offsets": data_file.split_offsets,
        "equality_ids": data_file.equality_ids,
        "key_metadata": _b64(data_file.key_metadata) if data_file.key_metadata else None,
    }
    for name in _INT_MAPS:
        values = getattr(data_file, name) or {}
        out[name] = {str(k): v for k, v in values.items()}
    for name in _BYTES_MAPS:
        values = getattr(data_file, name) or {}
        out[name] = {str(k): _b64(v) for k, v in values.items()}
    return out


def data_file_from_dict(raw: dict[str, Any]) -> DataFile:
    """The DataFile that :func:`data_file_to_dict` described."""
    if raw.get("v") != FORMAT_VERSION:
        raise ValueError(f"unknown DataFile JSON layout version {raw.get('v')!r}")
    key_metadata = raw.get("key_metadata")
    maps: dict[str, Any] = {name: {int(k): v for k, v in raw[name].items()} for name in _INT_MAPS}
    for name in _BYTES_MAPS:
        maps[name] = {int(k): base64.b64decode(v) for k, v in raw[name].items()}
    args: dict[str, Any] = {
        "content": DataFileContent(raw["content"]),
        "file_path": raw["file_path"],
        "file_format": FileFormat(raw["file_format"]),
        "partition": Record(*raw["partition"]),
        "record_count": raw["record_count"],
        "file_size_in_bytes": raw["file_size_in_bytes"],
        "sort_order_id": raw["sort_order_id"],
        "split_offsets": raw["split_offsets"],
        "equality_ids": raw["equality_ids"],
        "key_metadata": base64.b64decode(key_metadata) if key_metadata else None,
        **maps,
    }
    data_file = DataFile.from_args(**args)
    data_file.spec_id = raw["spec_id"]
    return data_file


def data_file_to_json(data_file: DataFile) -> str:
    return orjson.dumps(data_file_to_dict(data_file)).decode()


def data_file_from_json(text: str | bytes) -> DataFile:
    return data_file_from_dict(orjson.loads(text))
