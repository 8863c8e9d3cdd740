"""Inference of typed columns from messy JSON, and the rules a value must meet to be stored typed."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyiceberg.types import (
    BooleanType,
    DoubleType,
    FloatType,
    IntegerType,
    ListType,
    LongType,
    NestedField,
    StringType,
    StructType,
)

from common.schema.fitting import fits
from common.schema.inference import desired_data_struct, usable_key

pytestmark = pytest.mark.unit


def struct_of(values: list[dict[str, Any]], **limits: int) -> StructType | None:
    return desired_data_struct(
        None,
        values,
        max_columns=limits.get("max_columns", 1000),
        max_depth=limits.get("max_depth", 8),
    )


def names(struct: StructType | None) -> list[str]:
    return [] if struct is None else [f.name for f in struct.fields]


def test_nested_objects_become_structs_and_arrays_lists() -> None:
    struct = struct_of([{"user": {"login": "a", "id": 1}, "tags": ["x", "y"], "n": None}])
    assert struct is not None
    user = struct.field_by_name("user")
    assert user is not None and isinstance(user.field_type, StructType)
    assert names(user.field_type) == ["login", "id"]
    tags = struct.field_by_name("tags")
    assert tags is not None and isinstance(tags.field_type, ListType)
    assert tags.field_type.element_type == StringType()
    assert "n" not in names(struct)  # only null seen: no column yet


def test_a_list_seen_only_empty_is_a_list_of_strings() -> None:
    struct = struct_of([{"topics": []}])
    assert struct is not None
    topics = struct.field_by_name("topics")
    assert topics is not None and isinstance(topics.field_type, ListType)
    assert topics.field_type.element_type == StringType()


def test_long_and_double_for_one_key_make_a_double() -> None:
    struct = struct_of([{"v": 1}, {"v": 1.5}])
    assert struct is not None and struct.field_by_name("v").field_type == DoubleType()  # type: ignore[union-attr]


def test_conflicting_types_keep_the_first() -> None:
    struct = struct_of([{"v": "text"}, {"v": 3}])
    assert struct is not None and struct.field_by_name("v").field_type == StringType()  # type: ignore[union-attr]


def test_awkward_keys_get_no_column() -> None:
    struct = struct_of([{"": 1, "a.b": 2, "Name": "x", "name": "y", "ctl\x01": 3, "ok key": 4}])
    assert names(struct) == ["Name", "ok key"]


def test_limits_on_depth_and_width() -> None:
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(10):
        deep = {"d": deep}
    struct = struct_of([{"deep": deep, "shallow": {"a": {"b": 1}}, "flat": 1}], max_depth=3)
    # Then what is within the depth limit is typed; a value deeper than it gets no column
    # (it is rescued whole, and raw_event keeps it)
    assert names(struct) == ["shallow", "flat"]
    wide = struct_of([{f"k{i}": i for i in range(50)}], max_columns=10)
    assert len(names(wide)) == 10


def test_existing_columns_only_change_by_legal_promotion() -> None:
    existing = StructType(
        NestedField(1, "small", IntegerType(), required=False),
        NestedField(2, "n", LongType(), required=False),
        NestedField(3, "f", FloatType(), required=False),
    )
    struct = desired_data_struct(
        existing, [{"small": 2**40, "n": 2.5, "f": 1.25, "new": True}], max_columns=100, max_depth=8
    )
    assert struct is not None
    by_name = {f.name: f.field_type for f in struct.fields}
    assert by_name == {
        "small": LongType(),
        "n": LongType(),
        "f": DoubleType(),
        "new": BooleanType(),
    }


@pytest.mark.parametrize(
    ("value", "column", "ok"),
    [
        (1, LongType(), True),
        (True, LongType(), False),
        (2**63, LongType(), False),
        (2**31, IntegerType(), False),
        (1.5, LongType(), False),
        (3, DoubleType(), True),
        (2**60 + 1, DoubleType(), False),
        (math.inf, DoubleType(), False),
        (0.1, FloatType(), False),
        (0.5, FloatType(), True),
        ("x", StringType(), True),
        (1, StringType(), False),
        ({"a": 1}, StructType(NestedField(1, "a", LongType(), required=False)), True),
        ({"a": 1, "b": 2}, StructType(NestedField(1, "a", LongType(), required=False)), False),
        ({"a": 1, "b": None}, StructType(NestedField(1, "a", LongType(), required=False)), True),
        ([1, None, 2], ListType(1, LongType(), element_required=False), True),
        ([1, "x"], ListType(1, LongType(), element_required=False), False),
        (None, StringType(), True),
        ({"a": 1, "b": {}}, StructType(NestedField(1, "a", LongType(), required=False)), True),
        ({"a": {}}, StructType(NestedField(1, "a", LongType(), required=False)), False),
        ([], ListType(1, StringType(), element_required=False), True),
    ],
)
def test_fits_never_casts(value: Any, column: Any, ok: bool) -> None:
    assert fits(value, column) is ok


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=5), max_size=6))
def test_inferred_struct_is_valid_and_within_limits(values: list[dict[str, Any]]) -> None:
    # Given any messy data objects
    # When a struct is inferred with small limits
    struct = desired_data_struct(None, values, max_columns=12, max_depth=4)
    if struct is None:
        return

    # Then every column name is usable, no two differ only in case, and the width limit holds
    def leaves(t: Any) -> int:
        if isinstance(t, StructType):
            return sum(leaves(f.field_type) for f in t.fields)
        if isinstance(t, ListType):
            return leaves(t.element_type)
        return 1

    assert leaves(struct) <= 12
    top = names(struct)
    assert all(usable_key(n) for n in top)
    assert len({n.lower() for n in top}) == len(top)
    # And the values of the first object whose keys all got columns fit them
    for value in values:
        for key, child in value.items():
            field = struct.field_by_name(key) if usable_key(key) else None
            if field is not None and fits(child, field.field_type):
                json.dumps(child)  # a typed value is plain JSON data
