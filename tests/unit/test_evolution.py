"""Schema evolution analysis: changes, compatibility, and applying only what is safe."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyiceberg.schema import Schema
from pyiceberg.types import (
    DoubleType,
    FloatType,
    IcebergType,
    IntegerType,
    LongType,
    NestedField,
    StringType,
    StructType,
)

from common.lake.catalog import open_catalog
from common.schema.evolution import (
    AddField,
    AddRequiredField,
    ChangeType,
    DeleteField,
    MakeOptional,
    MakeRequired,
    PromoteType,
    RenameField,
    apply_compatible,
    compare_schemas,
    is_promotion,
)
from common.settings import load_settings

pytestmark = pytest.mark.unit


def schema(*fields: NestedField) -> Schema:
    return Schema(*fields)


def test_adding_an_optional_field_is_compatible_with_one_add_field() -> None:
    # Given a schema and the same schema with one more optional field
    old = schema(NestedField(1, "id", StringType(), required=True))
    new = schema(
        NestedField(1, "id", StringType(), required=True),
        NestedField(2, "note", StringType(), required=False),
    )
    # When compared
    report = compare_schemas(old, new)
    # Then there is exactly one AddField and the change is compatible
    assert report.compatible
    assert len(report.changes) == 1 and isinstance(report.changes[0], AddField)
    assert report.changes[0].path == ("note",)


def test_int_to_string_is_breaking() -> None:
    old = schema(NestedField(1, "n", IntegerType(), required=False))
    new = schema(NestedField(1, "n", StringType(), required=False))
    report = compare_schemas(old, new)
    assert not report.compatible
    assert len(report.breaking) >= 1 and isinstance(report.breaking[0], ChangeType)
    assert "breaking" in str(report)


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        (IntegerType(), LongType(), PromoteType),
        (FloatType(), DoubleType(), PromoteType),
        (LongType(), IntegerType(), ChangeType),
        (LongType(), DoubleType(), ChangeType),
        (DoubleType(), FloatType(), ChangeType),
        (StringType(), LongType(), ChangeType),
    ],
)
def test_promotions_follow_the_iceberg_spec(old: IcebergType, new: IcebergType, kind: type) -> None:
    report = compare_schemas(
        schema(NestedField(1, "x", old, required=False)),
        schema(NestedField(1, "x", new, required=False)),
    )
    assert [type(c) for c in report.changes] == [kind]


def test_optionality_and_required_additions() -> None:
    old = schema(
        NestedField(1, "a", StringType(), required=True),
        NestedField(2, "b", StringType(), required=False),
    )
    new = schema(
        NestedField(1, "a", StringType(), required=False),
        NestedField(2, "b", StringType(), required=True),
        NestedField(3, "c", StringType(), required=True),
    )
    kinds = {type(c) for c in compare_schemas(old, new).changes}
    assert kinds == {MakeOptional, MakeRequired, AddRequiredField}


def test_rename_is_found_by_field_id_and_deletion_is_breaking() -> None:
    old = schema(
        NestedField(1, "user", StringType(), required=False),
        NestedField(2, "gone", StringType(), required=False),
    )
    new = schema(NestedField(1, "login", StringType(), required=False))
    report = compare_schemas(old, new, match_by="id")
    assert {type(c) for c in report.changes} == {RenameField, DeleteField}
    rename = next(c for c in report.changes if isinstance(c, RenameField))
    assert (rename.old, rename.new) == ("user", "login")
    assert not report.compatible


def test_new_nested_struct_is_one_add_field() -> None:
    old = schema(NestedField(1, "id", StringType(), required=True))
    new = schema(
        NestedField(1, "id", StringType(), required=True),
        NestedField(
            2,
            "data",
            StructType(NestedField(3, "x", LongType(), required=False)),
            required=False,
        ),
    )
    report = compare_schemas(old, new)
    assert [(type(c), c.path) for c in report.changes] == [(AddField, ("data",))]


primitive = st.sampled_from([IntegerType(), LongType(), FloatType(), DoubleType(), StringType()])


@given(old=primitive, new=primitive)
def test_a_change_is_compatible_exactly_when_it_is_a_legal_promotion(
    old: IcebergType, new: IcebergType
) -> None:
    report = compare_schemas(
        schema(NestedField(1, "x", old, required=False)),
        schema(NestedField(1, "x", new, required=False)),
    )
    if old == new:
        assert report.changes == []
    else:
        assert report.compatible == is_promotion(old, new)


@given(
    names=st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), unique=True, max_size=6)
)
def test_adding_optional_fields_is_always_compatible(names: list[str]) -> None:
    base = [NestedField(1, "id", StringType(), required=True)]
    added = [
        NestedField(10 + i, f"f_{n}", StringType(), required=False) for i, n in enumerate(names)
    ]
    report = compare_schemas(schema(*base), schema(*base, *added))
    assert report.compatible
    assert len(report.changes) == len(names)
    assert all(isinstance(c, AddField) for c in report.changes)


def test_apply_compatible_applies_safe_changes_and_never_breaking_ones(tmp_path: Path) -> None:
    # Given a table with an int and a string column
    catalog = open_catalog(load_settings({}, home=tmp_path))
    catalog.create_namespace("t")
    table = catalog.create_table(
        ("t", "x"),
        schema=schema(
            NestedField(1, "n", IntegerType(), required=False),
            NestedField(2, "s", StringType(), required=False),
        ),
    )
    # When a desired schema promotes n, adds a field and changes s to long
    desired = schema(
        NestedField(1, "n", LongType(), required=False),
        NestedField(2, "s", LongType(), required=False),
        NestedField(3, "extra", DoubleType(), required=False),
    )
    report = compare_schemas(table.schema(), desired)
    skipped = apply_compatible(table, report, desired)
    # Then the promotion and the addition are applied, the breaking change is not
    fresh = catalog.load_table(("t", "x"))
    assert fresh.schema().find_field("n").field_type == LongType()
    assert fresh.schema().find_field("extra").field_type == DoubleType()
    assert fresh.schema().find_field("s").field_type == StringType()
    assert [type(c) for c in skipped] == [ChangeType]
    with contextlib.suppress(Exception):
        catalog.close()  # type: ignore[attr-defined]
