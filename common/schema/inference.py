"""Typed columns from messy JSON: the ``data`` struct a table should have to hold a batch.

Inference works on *shapes* (``"long"``, ``"string"``, :class:`StructShape`, :class:`ListShape`),
which carry no field ids, and only the result becomes Iceberg types. Rules:

- objects become structs, arrays become lists of the merged shape of their elements (a list seen
  only empty becomes ``list<string>``), nulls say nothing (a key seen only with null gets no column
  until a value arrives), and inside a struct an empty object ``{}`` counts as no value, like null
  (``raw_event`` keeps the difference);
- ``long`` and ``double`` seen for one new key make a ``double`` column (every such long is exact
  in a double or it is rescued); any other conflict keeps the first shape, and the values that do
  not fit are rescued, never cast;
- an existing column never changes type except by a legal promotion (int → long, float → double);
- keys that make poor column names (empty, dotted, control characters, or equal to a sibling but
  for case, which many engines fold) get no column, so values holding them are rescued whole;
- beyond ``max_depth`` levels or ``max_columns`` leaf columns nothing more is typed: those values
  stay in ``raw_event`` and ``_rescued_data``.

Whether a value fits a column as it is (else it is rescued) is :mod:`common.schema.fitting`.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyiceberg.types import (
    BooleanType,
    DoubleType,
    FloatType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    NestedField,
    StringType,
    StructType,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_KEY_CHARS = 255
_BAD_KEY_CHARS = re.compile(r"[.\x00-\x1f\x7f]")


@dataclass
class StructShape:
    fields: dict[str, Shape] = field(default_factory=dict)


@dataclass
class ListShape:
    element: Shape | None = None  # None: only empty lists (or nulls) seen so far


Shape = str | StructShape | ListShape

_PRIMITIVES: dict[str, IcebergType] = {
    "boolean": BooleanType(),
    "int": IntegerType(),
    "long": LongType(),
    "float": FloatType(),
    "double": DoubleType(),
    "string": StringType(),
}
_PROMOTIONS = {("int", "long"): "long", ("float", "double"): "double"}


@functools.lru_cache(maxsize=65_536)
def usable_key(key: str) -> bool:
    """Keys that make safe column names: non-empty, no dots (name paths), no control chars."""
    return 0 < len(key) <= MAX_KEY_CHARS and not _BAD_KEY_CHARS.search(key)


def _scalar_shape(value: Any) -> Shape | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long" if INT64_MIN <= value <= INT64_MAX else None
    if isinstance(value, float):
        return "double" if math.isfinite(value) else None
    if isinstance(value, str):
        return "string"
    return None


def infer_shape(value: Any, depth: int, max_depth: int) -> Shape | None:
    """The shape of one JSON value at nesting ``depth`` (1 = a top-level ``data`` field)."""
    if not isinstance(value, dict | list):
        return _scalar_shape(value)
    if depth >= max_depth:
        return None
    if isinstance(value, list):
        element: Shape | None = None
        for item in value:
            element = merge_shapes(element, infer_shape(item, depth + 1, max_depth))
        return ListShape(element)
    struct = StructShape()
    folded: set[str] = set()
    for key, child in value.items():
        if not usable_key(key) or key.lower() in folded:
            continue
        folded.add(key.lower())
        shape = infer_shape(child, depth + 1, max_depth)
        if shape is not None:
            struct.fields[key] = shape
    return struct


def merge_shapes(
    first: Shape | None, second: Shape | None, *, existing: bool = False
) -> Shape | None:
    """One shape for values of both shapes; ``first`` wins a conflict.

    With ``existing=True``, ``first`` is a column the table has: its primitives only change by a
    legal promotion, and its structs stay as they are.
    """
    if first is None:
        return second
    if second is None:
        return first
    if isinstance(first, str) and isinstance(second, str):
        return _merge_primitives(first, second, existing=existing)
    if isinstance(first, StructShape) and isinstance(second, StructShape):
        if existing:
            # A struct column keeps its fields: readers such as iceberg-rust fail on files
            # written before a field was added to a struct (see common/schema/layout.py).
            return first
        merged = StructShape(dict(first.fields))
        folded = {k.lower(): k for k in merged.fields}
        for key, shape in second.fields.items():
            if key in merged.fields:
                merged.fields[key] = (
                    merge_shapes(merged.fields[key], shape, existing=existing) or merged.fields[key]
                )
            elif key.lower() not in folded:
                merged.fields[key] = shape
                folded[key.lower()] = key
        return merged
    if isinstance(first, ListShape) and isinstance(second, ListShape):
        return ListShape(merge_shapes(first.element, second.element, existing=existing))
    return first


def _merge_primitives(first: str, second: str, *, existing: bool) -> str:
    if first == second:
        return first
    if (first, second) in _PROMOTIONS:
        return _PROMOTIONS[(first, second)]
    if not existing and {first, second} == {"long", "double"}:
        return "double"
    return first


def shape_of_type(field_type: IcebergType) -> Shape | None:
    """The shape of an existing column (None for types inference never makes: maps, dates...)."""
    for name, primitive in _PRIMITIVES.items():
        if field_type == primitive:
            return name
    if isinstance(field_type, StructType):
        return StructShape(
            {f.name: s for f in field_type.fields if (s := shape_of_type(f.field_type)) is not None}
        )
    if isinstance(field_type, ListType):
        return ListShape(shape_of_type(field_type.element_type))
    return None


def leaf_count(shape: Shape | None) -> int:
    if shape is None:
        return 0
    if isinstance(shape, StructShape):
        return sum(leaf_count(s) for s in shape.fields.values())
    if isinstance(shape, ListShape):
        return leaf_count(shape.element) if shape.element is not None else 1
    return 1


def _to_type(shape: Shape | None, ids: Iterator[int]) -> IcebergType | None:
    if shape is None:
        return None
    if isinstance(shape, str):
        return _PRIMITIVES[shape]
    if isinstance(shape, ListShape):
        # Only empty lists seen: list<string> keeps [] exact; other elements later are rescued.
        element = _to_type(shape.element, ids) if shape.element is not None else StringType()
        if element is None:
            return None
        return ListType(next(ids), element, element_required=False)
    fields = []
    for key, child in shape.fields.items():
        child_type = _to_type(child, ids)
        if child_type is not None:
            fields.append(NestedField(next(ids), key, child_type, required=False))
    return StructType(*fields) if fields else None


def desired_data_struct(
    existing: StructType | None,
    data_values: Iterable[Mapping[str, Any]],
    *,
    max_columns: int,
    max_depth: int,
    first_id: int = 1,
    reserved: Iterable[str] = (),
) -> StructType | None:
    """The ``data`` struct holding the existing columns and what ``data_values`` need.

    Field ids of the result are placeholders counted from ``first_id`` (pick it above every id of
    the schema the struct goes into, so ids stay unique): compare it with the table by name path.
    """
    merged = shape_of_type(existing) if existing is not None else StructShape()
    assert isinstance(merged, StructShape)
    base_names = set(merged.fields)
    batch: StructShape | None = None
    for data in data_values:
        shape = infer_shape(data, 0, max_depth + 1)
        if isinstance(shape, StructShape):
            batch = merge_shapes(batch, shape)  # type: ignore[assignment]
    if batch is not None:
        folded = {k.lower() for k in merged.fields} | {r.lower() for r in reserved}
        budget = max_columns - leaf_count(merged)
        for key, shape in batch.fields.items():
            if key in base_names:
                grown = merge_shapes(merged.fields[key], shape, existing=True)
                extra = leaf_count(grown) - leaf_count(merged.fields[key])
                if grown is not None and extra <= budget:
                    merged.fields[key] = grown
                    budget -= extra
            elif key.lower() not in folded and 0 < leaf_count(shape) <= budget:
                merged.fields[key] = shape
                folded.add(key.lower())
                budget -= leaf_count(shape)
    result = _to_type(merged, itertools.count(first_id))
    return result if isinstance(result, StructType) else None
