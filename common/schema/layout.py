"""The table layout of an event table, and the projection of events onto it.

Every table has the CloudEvents envelope (typed context attributes, extensions as a string map),
``raw_event`` (the event exactly as received, so nothing is ever lost), ``_ingested_at``,
``_batch_id`` and ``_rescued_data`` (a JSON object of the ``data`` fields that have no typed
column, or whose value does not fit it). The fields of the event's ``data`` object become typed
top-level columns beside them: ``SELECT action, repository.name FROM events.push``.

Why top-level columns and not one ``data`` struct: Iceberg allows adding a field to a struct,
but the iceberg-rust reader (and engines built on it) fails on files written before such an
addition ("Incorrect number of arrays for StructArray fields"), while added top-level columns
read as null everywhere. So new ``data`` keys become new top-level columns, and a nested struct
column keeps the fields it was created with: a value with a key its struct lacks is rescued whole.
A ``data`` key equal to an envelope column (``id``, ``type``, ``time``...) or to another column
but for case is rescued too.

A value is never silently cast: an ``int`` fits a ``long`` column, a ``long`` fits ``double`` only
when exactly representable, everything else that does not fit goes to ``_rescued_data``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform
from pyiceberg.types import (
    IcebergType,
    MapType,
    NestedField,
    StringType,
    StructType,
    TimestamptzType,
)

from common.ingest.events import Event, paused_gc
from common.schema.fitting import fits, misfits
from common.schema.inference import desired_data_struct
from common.settings import SchemaMode

DATA = "data"
RESCUED = "_rescued_data"
CONTEXT_ATTRIBUTES = (
    "id",
    "source",
    "type",
    "specversion",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
)
NOT_DATA_SENTINEL = "$data"  # key in _rescued_data for a `data` value that is not an object
ALIASES_PROPERTY = "icefleet.data-aliases"


def base_schema() -> Schema:
    """The envelope every event table starts with; ``data`` fields are added as they appear."""
    return Schema(
        NestedField(1, "id", StringType(), required=True),
        NestedField(2, "source", StringType(), required=True),
        NestedField(3, "type", StringType(), required=True),
        NestedField(4, "specversion", StringType(), required=True),
        NestedField(5, "time", TimestamptzType(), required=False),
        NestedField(6, "subject", StringType(), required=False),
        NestedField(7, "datacontenttype", StringType(), required=False),
        NestedField(8, "dataschema", StringType(), required=False),
        NestedField(
            9,
            "extensions",
            MapType(10, StringType(), 11, StringType(), value_required=False),
            required=False,
        ),
        NestedField(12, "raw_event", StringType(), required=True),
        NestedField(13, "_ingested_at", TimestamptzType(), required=True),
        NestedField(14, "_batch_id", StringType(), required=False),
        NestedField(15, RESCUED, StringType(), required=False),
    )


def day_partition_spec(schema: Schema) -> PartitionSpec:
    """``day(time)``: events of one day share files; time-range scans prune by partition."""
    time_field = schema.find_field("time")
    return PartitionSpec(
        PartitionField(
            source_id=time_field.field_id, field_id=1000, transform=DayTransform(), name="time_day"
        )
    )


# --- the data columns ------------------------------------------------------------------------------


def data_columns(schema: Schema) -> StructType:
    """The typed ``data`` columns of a table: its top-level fields beyond the envelope."""
    return StructType(*(f for f in schema.fields if f.name not in ENVELOPE_COLUMNS))


def aliases(properties: Mapping[str, str]) -> dict[str, str]:
    """Renamed ``data`` keys: old key → current column name (kept in a table property)."""
    text = properties.get(ALIASES_PROPERTY)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def desired_schema(
    schema: Schema,
    events: Iterable[Event],
    *,
    max_columns: int,
    max_depth: int,
    renamed: Mapping[str, str] | None = None,
) -> Schema:
    """``schema`` with the ``data`` columns grown to type what ``events`` carry.

    Field ids of what is new are placeholders: compare with ``compare_schemas(match_by="name")``.
    """
    renamed = renamed or {}
    values = (
        {renamed.get(k, k): v for k, v in data.items()} if renamed else data
        for e in events
        if isinstance(data := e.attributes.get(DATA), dict)
    )
    existing = data_columns(schema)
    struct = desired_data_struct(
        existing,
        values,
        max_columns=max_columns,
        max_depth=max_depth,
        first_id=max(schema.highest_field_id, 0) + 1,
        reserved=ENVELOPE_COLUMNS,
    )
    if struct is None:
        return schema
    by_name = {f.name: f for f in struct.fields}
    kept = [by_name.pop(f.name, f) for f in schema.fields]
    return Schema(*kept, *by_name.values())


# --- projection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """Events projected onto a table schema, ready to write."""

    table: pa.Table
    rejected: list[tuple[Event, str]]  # strict mode: events that don't fit, with the reason
    spilled: list[Event]  # evolve mode: events that rescued a value a new column might hold


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        # orjson refuses integers beyond 64 bits, which valid events may carry; the stdlib
        # writes them exactly.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _extension_text(value: Any) -> str:
    return value if isinstance(value, str) else _json_text(value)


def project(
    events: Sequence[Event],
    schema: Schema,
    arrow_schema: pa.Schema,
    *,
    batch_id: str,
    ingested_at: datetime,
    mode: SchemaMode,
    renamed: Mapping[str, str] | None = None,
) -> Projection:
    """Build the Arrow table of ``events`` for ``schema`` (whose Arrow form is ``arrow_schema``).

    In ``evolve`` mode what has no column, or does not fit it, goes to ``_rescued_data``; in
    ``strict`` mode such an event is rejected with the reason; in ``raw`` mode ``data`` is left
    to ``raw_event``.

    Built column by column, the hot path of a writer: ``data`` values go straight into one list
    per column, each column is checked at once (:func:`~common.schema.fitting.column_checker`), and
    only the events with something to rescue (a key without a column, a value that does not fit,
    a renamed key, a ``data`` that is not an object) take the row-by-row path of
    :func:`_project_row`.
    """
    with paused_gc():
        return _project(events, schema, arrow_schema, batch_id, ingested_at, mode, renamed)


def _project(
    events: Sequence[Event],
    schema: Schema,
    arrow_schema: pa.Schema,
    batch_id: str,
    ingested_at: datetime,
    mode: SchemaMode,
    renamed: Mapping[str, str] | None,
) -> Projection:
    n = len(events)
    field_types = (
        {f.name: f.field_type for f in data_columns(schema).fields} if mode != "raw" else {}
    )
    slots: dict[str, list[Any]] = {}
    odd: set[int] = set()
    if mode != "raw":
        slots, odd = _fill_data_columns(events, list(field_types), renamed)
    for name, values in slots.items():
        odd.update(misfits(values, field_types[name]))

    rescued: list[str | None] = [None] * n
    rejected: list[tuple[Event, str]] = []
    spilled: list[Event] = []
    dropped: list[int] = []
    for i in sorted(odd):
        event = events[i]
        data = event.attributes.get(DATA)
        for key in data if isinstance(data, dict) else ():
            if key in slots:
                slots[key][i] = None
        row, spill = _project_row(event, field_types, renamed)
        if spill and any(v is not None and v != {} for v in spill.values()):
            spilled.append(event)
        if spill and mode == "strict":
            key = next(iter(spill))
            why = "has no column" if key not in field_types else "does not fit its column's type"
            rejected.append((event, f"data.{key}: {why} in strict mode"))
            dropped.append(i)
            continue
        for column, value in row.items():
            slots[column][i] = value
        rescued[i] = _json_text(spill) if spill else None

    kept: Sequence[Event] = events
    if dropped:
        keep = sorted(set(range(n)).difference(dropped))
        kept = [events[i] for i in keep]
        rescued = [rescued[i] for i in keep]
        slots = {name: [values[i] for i in keep] for name, values in slots.items()}
    table = _arrow_table(kept, slots, rescued, arrow_schema, batch_id, ingested_at)
    return Projection(table=table, rejected=rejected, spilled=spilled)


def _fill_data_columns(
    events: Sequence[Event], names: Sequence[str], renamed: Mapping[str, str] | None
) -> tuple[dict[str, list[Any]], set[int]]:
    """Each data column's values, one per event (None where an event has none), and the events
    that need :func:`_project_row`: a key without a column, a renamed key, ``data`` that is not
    an object (their values in the lists are to be replaced)."""
    datas = [e.attributes.get(DATA) for e in events]
    columns = frozenset(names)
    odd = {
        i
        for i, data in enumerate(datas)
        if data is not None and (type(data) is not dict or not columns.issuperset(data))
    }
    if renamed:
        old = renamed.keys()
        odd.update(
            i for i, data in enumerate(datas) if type(data) is dict and not old.isdisjoint(data)
        )
    objects = [data if type(data) is dict else _NO_DATA for data in datas]
    return {name: [data.get(name) for data in objects] for name in names}, odd


_NO_DATA: dict[str, Any] = {}


def _project_row(
    event: Event, field_types: Mapping[str, IcebergType], renamed: Mapping[str, str] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One event's typed ``data`` values by column, and what it rescues (by ``data`` key)."""
    attrs = event.attributes
    data = attrs.get(DATA)
    row: dict[str, Any] = {}
    spill: dict[str, Any] = {}
    if DATA in attrs:
        if isinstance(data, dict):
            for key, value in data.items():
                column = renamed.get(key, key) if renamed else key
                column_type = field_types.get(column)
                if column_type is not None and column not in row and fits(value, column_type):
                    row[column] = value
                elif value is not None or column_type is None:
                    spill[key] = value
        elif data is not None:
            spill[NOT_DATA_SENTINEL] = data
    return row, spill


def _arrow_table(
    events: Sequence[Event],
    data: dict[str, list[Any]],
    rescued: list[str | None],
    arrow_schema: pa.Schema,
    batch_id: str,
    ingested_at: datetime,
) -> pa.Table:
    n = len(events)
    attributes = [e.attributes for e in events]
    values: dict[str, Any] = {
        name: [a.get(name) for a in attributes] for name in CONTEXT_ATTRIBUTES if name != "time"
    }
    values["time"] = [e.time for e in events]
    values["extensions"] = [
        None
        if _NOT_EXTENSIONS.issuperset(a)
        else [(k, _extension_text(v)) for k, v in a.items() if k not in _NOT_EXTENSIONS]
        for a in attributes
    ]
    values["raw_event"] = [e.raw for e in events]
    values[RESCUED] = rescued
    values.update(data)
    constant = {"_ingested_at": ingested_at, "_batch_id": batch_id}
    arrays = []
    for field in arrow_schema:
        if field.name in constant:
            arrays.append(pa.repeat(pa.scalar(constant[field.name], type=field.type), n))
        elif field.name in values:
            arrays.append(pa.array(values[field.name], type=field.type))
        else:
            arrays.append(pa.nulls(n, type=field.type))
    return pa.Table.from_arrays(arrays, schema=arrow_schema)


_NOT_EXTENSIONS = frozenset((*CONTEXT_ATTRIBUTES, DATA, "data_base64"))
ENVELOPE_COLUMNS = frozenset(f.name for f in base_schema().fields)
