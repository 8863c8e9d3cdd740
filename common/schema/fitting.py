"""Whether JSON values fit a column type as they are (else they are rescued, never cast).

``fits`` runs for every value of every batch, so the type dispatch is done once per column type:
:func:`value_checker` compiles a type into a closure (cached), and :func:`column_checker` into a
check of a whole column at once that does its work in C where it can (``set(map(type, ...))``,
``min``/``max``). A column check may answer False for a column whose values all fit (it is
conservative): callers then look at the values one by one with the value check, which is exact.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable
from typing import Any

from pyiceberg.types import (
    BooleanType,
    DoubleType,
    FloatType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    StringType,
    StructType,
)

FLOAT_EXACT_INT = 2**53

Check = Callable[[Any], bool]
ColumnCheck = Callable[[list[Any]], bool]
_NONE = type(None)
_STR_KINDS = frozenset((str, _NONE))
_BOOL_KINDS = frozenset((bool, _NONE))
_INT_KINDS = frozenset((int, _NONE))
_NUMBER_KINDS = frozenset((int, float, _NONE))
_DICT_KINDS = frozenset((dict, _NONE))
_LIST_KINDS = frozenset((list, _NONE))


def _cached(build: Callable[[IcebergType], Any]) -> Callable[[IcebergType], Any]:
    """Memoise per column type; types that cannot be hashed are compiled every time."""
    memo = functools.lru_cache(maxsize=4096)(build)

    def get(column_type: IcebergType) -> Any:
        try:
            return memo(column_type)
        except TypeError:  # an unhashable type
            return build(column_type)

    return get


def _build_value_checker(column_type: IcebergType) -> Check:  # noqa: C901 - one branch per type
    """``fits`` for one column type, as a closure (None fits everything, checked by callers too)."""
    if isinstance(column_type, StringType):
        return lambda v: v is None or isinstance(v, str)
    if isinstance(column_type, BooleanType):
        return lambda v: v is None or isinstance(v, bool)
    if isinstance(column_type, LongType | IntegerType):
        limit = 2**31 if isinstance(column_type, IntegerType) else 2**63
        low = -limit

        def integer(v: Any) -> bool:
            if type(v) is int:
                return low <= v < limit
            if v is None:
                return True
            return isinstance(v, int) and not isinstance(v, bool) and low <= v < limit

        return integer
    if isinstance(column_type, DoubleType):

        def double(v: Any) -> bool:
            if isinstance(v, float):
                return math.isfinite(v)
            if v is None:
                return True
            return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= FLOAT_EXACT_INT

        return double
    if isinstance(column_type, FloatType):  # only in tables made by other tools: exact or rescued

        def single(v: Any) -> bool:
            if v is None:
                return True
            if isinstance(v, bool) or not isinstance(v, int | float) or abs(v) > 3.4e38:
                return False
            return bool(struct.unpack("f", struct.pack("f", v))[0] == v)

        return single
    if isinstance(column_type, StructType):
        children = {f.name: value_checker(f.field_type) for f in column_type.fields}

        def record(v: Any) -> bool:
            if v is None:
                return True
            if not isinstance(v, dict):
                return False
            for key, child in v.items():
                check = children.get(key)
                if check is None:
                    if child is not None and child != {}:
                        return False
                elif not check(child):
                    return False
            return True

        return record
    if isinstance(column_type, ListType):
        element = value_checker(column_type.element_type)
        return lambda v: v is None or (isinstance(v, list) and all(map(element, v)))
    return lambda v: v is None


value_checker: Callable[[IcebergType], Check] = _cached(_build_value_checker)


def _build_column_checker(column_type: IcebergType) -> ColumnCheck:  # noqa: C901
    """True only if every value of a column fits ``column_type`` (False: look value by value)."""
    each = value_checker(column_type)

    def slow(values: list[Any]) -> bool:
        return all(map(each, values))

    if isinstance(column_type, StringType):
        return lambda values: _STR_KINDS.issuperset(map(type, values))
    if isinstance(column_type, BooleanType):
        return lambda values: _BOOL_KINDS.issuperset(map(type, values))
    if isinstance(column_type, LongType | IntegerType):
        limit = 2**31 if isinstance(column_type, IntegerType) else 2**63

        def integers(values: list[Any]) -> bool:
            kinds = set(map(type, values))
            if not _INT_KINDS.issuperset(kinds):
                return slow(values)
            numbers = [v for v in values if v is not None] if _NONE in kinds else values
            return not numbers or (-limit <= min(numbers) and max(numbers) < limit)

        return integers
    if isinstance(column_type, DoubleType):

        def doubles(values: list[Any]) -> bool:
            kinds = set(map(type, values))
            if not _NUMBER_KINDS.issuperset(kinds):
                return slow(values)
            numbers = [v for v in values if v is not None] if _NONE in kinds else values
            if int in kinds:
                ints = [v for v in numbers if type(v) is int]
                if min(ints) < -FLOAT_EXACT_INT or max(ints) > FLOAT_EXACT_INT:
                    return False
            return all(map(math.isfinite, numbers))

        return doubles
    if isinstance(column_type, StructType):
        names = frozenset(f.name for f in column_type.fields)
        children = [(f.name, column_checker(f.field_type)) for f in column_type.fields]

        def records(values: list[Any]) -> bool:
            kinds = set(map(type, values))
            if not _DICT_KINDS.issuperset(kinds):
                return slow(values)
            present = [v for v in values if v is not None] if _NONE in kinds else values
            if not all(map(names.issuperset, present)):
                return False  # a key without a field: only null or {} may be there
            return all(check([v.get(name) for v in present]) for name, check in children)

        return records
    if isinstance(column_type, ListType):
        element = column_checker(column_type.element_type)

        def lists(values: list[Any]) -> bool:
            kinds = set(map(type, values))
            if not _LIST_KINDS.issuperset(kinds):
                return slow(values)
            return element([item for v in values if v for item in v])

        return lists
    return slow


column_checker: Callable[[IcebergType], ColumnCheck] = _cached(_build_column_checker)


def misfits(values: list[Any], column_type: IcebergType) -> list[int]:
    """The indexes of the values that do not fit ``column_type`` (``fits`` is False)."""
    if column_checker(column_type)(values):
        return []
    each = value_checker(column_type)
    return [i for i, v in enumerate(values) if not each(v)]


def fits(value: Any, column_type: IcebergType) -> bool:
    """True when ``value`` is stored in a column of ``column_type`` without changing it."""
    return value is None or value_checker(column_type)(value)


__all__ = ["column_checker", "fits", "misfits", "value_checker"]
