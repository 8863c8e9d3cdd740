"""Schema evolution analysis: what changed between two schemas, and is it safe?

Fields are matched by id when a field id is in both schemas (two versions of one table: a changed
name is a rename), else by name path (a schema inferred from events against a table's schema).

Compatible changes, applied by :func:`apply_compatible`: adding an optional field, the promotions
the Iceberg spec allows (int → long, float → double, decimal precision widening), required →
optional, and renames. Breaking changes are reported and never applied: a type change that is not
a legal promotion (int → string, long → double), optional → required, adding a required field,
and dropping a field (readers and writers of the old schema would break).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import (
    DecimalType,
    DoubleType,
    FloatType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    MapType,
    NestedField,
    PrimitiveType,
    StructType,
)

from common.errors import SchemaConflictError
from common.schema.layout import ALIASES_PROPERTY, ENVELOPE_COLUMNS, aliases


@dataclass(frozen=True)
class SchemaChange:
    """One difference between two schemas."""

    path: tuple[str, ...]
    old: str | None = None
    new: str | None = None
    compatible = True

    @property
    def name(self) -> str:
        return ".".join(self.path)

    def __str__(self) -> str:
        arrow = f": {self.old} -> {self.new}" if self.old or self.new else ""
        verdict = "" if self.compatible else " (breaking)"
        return f"{type(self).__name__} {self.name}{arrow}{verdict}"


@dataclass(frozen=True)
class AddField(SchemaChange):
    """A new optional field: old rows read null."""


@dataclass(frozen=True)
class PromoteType(SchemaChange):
    """A type widening the Iceberg spec allows (int → long, float → double)."""


@dataclass(frozen=True)
class MakeOptional(SchemaChange):
    """A required field becomes optional."""


@dataclass(frozen=True)
class RenameField(SchemaChange):
    """Same field id, new name: files written before read under the new name."""


@dataclass(frozen=True)
class ChangeType(SchemaChange):
    """A type change that is not a legal promotion (int → string)."""

    compatible = False


@dataclass(frozen=True)
class MakeRequired(SchemaChange):
    """An optional field becomes required: old rows may hold nulls."""

    compatible = False


@dataclass(frozen=True)
class AddRequiredField(SchemaChange):
    """A new required field: old rows have no value for it."""

    compatible = False


@dataclass(frozen=True)
class DeleteField(SchemaChange):
    """A field is gone from the new schema."""

    compatible = False


@dataclass
class EvolutionReport:
    """Every change from one schema to another."""

    changes: list[SchemaChange] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return all(c.compatible for c in self.changes)

    @property
    def breaking(self) -> list[SchemaChange]:
        return [c for c in self.changes if not c.compatible]

    def __str__(self) -> str:
        if not self.changes:
            return "no changes"
        return "\n".join(str(c) for c in self.changes)


def is_promotion(old: IcebergType, new: IcebergType) -> bool:
    """True when the Iceberg spec lets a column of type ``old`` become ``new``."""
    if isinstance(old, IntegerType) and isinstance(new, LongType):
        return True
    if isinstance(old, FloatType) and isinstance(new, DoubleType):
        return True
    return (
        isinstance(old, DecimalType)
        and isinstance(new, DecimalType)
        and old.scale == new.scale
        and new.precision >= old.precision
    )


def _children(field_type: IcebergType) -> list[NestedField]:
    if isinstance(field_type, StructType):
        return list(field_type.fields)
    if isinstance(field_type, ListType):
        return [field_type.element_field]
    if isinstance(field_type, MapType):
        return [field_type.key_field, field_type.value_field]
    return []


def _walk(
    fields: list[NestedField], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], NestedField]]:
    for f in fields:
        path = (*prefix, f.name)
        yield path, f
        yield from _walk(_children(f.field_type), path)


def _type_name(t: IcebergType) -> str:
    return str(t) if isinstance(t, PrimitiveType) else type(t).__name__.removesuffix("Type").lower()


def compare_schemas(old: Schema, new: Schema, *, match_by: str = "name") -> EvolutionReport:
    """The changes that turn ``old`` into ``new``.

    ``match_by="id"`` pairs fields by field id (two versions of one table, so a new name is a
    rename); ``"name"`` pairs them by name path (a schema inferred from events, whose ids mean
    nothing to the table).
    """
    old_by_path = dict(_walk(list(old.fields)))
    old_by_id = {f.field_id: (p, f) for p, f in old_by_path.items()}
    report = EvolutionReport()
    matched_new: set[tuple[str, ...]] = set()
    matched_old: set[tuple[str, ...]] = set()
    for path, new_field in _walk(list(new.fields)):
        if match_by == "id":
            old_path, old_field = old_by_id.get(new_field.field_id, (None, None))
        else:
            old_path, old_field = path, old_by_path.get(path)
        if old_field is None or old_path is None:
            if len(path) == 1 or path[:-1] in matched_new:  # else reported with its new parent
                kind = AddRequiredField if new_field.required else AddField
                report.changes.append(kind(path, None, _type_name(new_field.field_type)))
            continue
        matched_new.add(path)
        matched_old.add(old_path)
        report.changes.extend(_pair_changes(path, old_path, old_field, new_field))
    for path, old_field in old_by_path.items():
        if path not in matched_old and (len(path) == 1 or path[:-1] in matched_old):
            report.changes.append(DeleteField(path, _type_name(old_field.field_type), None))
    return report


def _pair_changes(
    path: tuple[str, ...], old_path: tuple[str, ...], old_field: NestedField, new_field: NestedField
) -> list[SchemaChange]:
    changes: list[SchemaChange] = []
    if old_path[-1] != path[-1]:
        changes.append(RenameField(path, old_path[-1], path[-1]))
    old_type, new_type = old_field.field_type, new_field.field_type
    if isinstance(old_type, PrimitiveType) and isinstance(new_type, PrimitiveType):
        if old_type != new_type:
            kind = PromoteType if is_promotion(old_type, new_type) else ChangeType
            changes.append(kind(path, _type_name(old_type), _type_name(new_type)))
    elif type(old_type) is not type(new_type):
        changes.append(ChangeType(path, _type_name(old_type), _type_name(new_type)))
    if old_field.required and not new_field.required:
        changes.append(MakeOptional(path, "required", "optional"))
    elif new_field.required and not old_field.required:
        changes.append(MakeRequired(path, "optional", "required"))
    return changes


def apply_compatible(table: Table, report: EvolutionReport, new: Schema) -> list[SchemaChange]:
    """Apply the compatible changes of ``report`` (computed against ``new``) to ``table``.

    Breaking changes are skipped and returned, never applied. The caller holds the table lock.
    """
    new_by_path = dict(_walk(list(new.fields)))
    skipped = report.breaking
    todo = [c for c in report.changes if c.compatible]
    if not todo:
        return skipped
    with table.update_schema() as update:
        for change in todo:
            target = new_by_path[change.path]
            if isinstance(change, AddField):
                update.add_column(change.path, target.field_type, required=False)
            elif isinstance(change, PromoteType) and isinstance(target.field_type, PrimitiveType):
                update.update_column(change.path, field_type=target.field_type)
            elif isinstance(change, MakeOptional):
                update.make_column_optional(change.path)
            elif isinstance(change, RenameField) and change.old is not None:
                update.rename_column((*change.path[:-1], change.old), change.path[-1])
    return skipped


def rename_data_field(table: Table, old: str, new: str) -> Table:
    """Rename the ``data`` column ``old`` to ``new`` and remember the old key as an alias.

    The column keeps its field id, so files written before read under the new name; the alias
    (table property ``icefleet.data-aliases``) makes writers put events that still carry the old
    key into the renamed column instead of growing a new one. One catalog transaction for both.
    The caller holds the table lock.
    """
    names = {f.name for f in table.schema().fields}
    if old in ENVELOPE_COLUMNS or old not in names:
        raise SchemaConflictError(str(table.name()), old, "is not a data column of the table")
    if new in names or new.lower() in {n.lower() for n in names}:
        raise SchemaConflictError(str(table.name()), new, "is already a column of the table")
    current = aliases(table.metadata.properties)
    updated = {k: (new if v == old else v) for k, v in current.items() if k != new}
    updated[old] = new
    with table.transaction() as tx:
        with tx.update_schema() as update:
            update.rename_column(old, new)
        tx.set_properties({ALIASES_PROPERTY: json.dumps(updated, sort_keys=True)})
    return table
