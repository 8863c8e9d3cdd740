"""common.maintenance.invariants against real tables in a SQLite catalog under tmp_path.

Healthy lineages are built with plain pyiceberg (appends, deletes, overwrites, snapshot expiry).
Broken ones are either made with legitimate catalog operations (commit-seq summaries out of order,
a snapshot expired from the middle of the history) or built in memory from a healthy table's
metadata: nothing on disk is corrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import EqualTo
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Operation, Summary
from pyiceberg.types import LongType, NestedField, StringType

from common.commit.committer import SEQ_PROPERTY
from common.maintenance.invariants import (
    MAX_CLOCK_SKEW_MS,
    assert_exactly_once,
    table_ids,
    validate_lineage,
    validate_metadata,
)

pytestmark = pytest.mark.unit

SCHEMA = Schema(
    NestedField(1, "id", StringType(), required=True),
    NestedField(2, "n", LongType(), required=False),
)
ARROW = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("n", pa.int64())])


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    catalog = SqlCatalog(
        "test", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=warehouse.as_uri()
    )
    catalog.create_namespace("t")
    return catalog


@pytest.fixture
def table(catalog: Catalog) -> Table:
    return catalog.create_table(("t", "events"), schema=SCHEMA)


def rows(*ids: str) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "n": k} for k, i in enumerate(ids)], schema=ARROW)


def append(table: Table, *ids: str, seq: int | None = None) -> None:
    props = {SEQ_PROPERTY: str(seq)} if seq is not None else {}
    table.append(rows(*ids), snapshot_properties=props)


def healthy_history(table: Table) -> None:
    """Appends with and without a commit-seq, a copy-on-write delete and an overwrite."""
    append(table, "a", "b", seq=1)
    append(table, "c")  # an outside writer: no seq
    append(table, "d", "e", seq=2)
    table.delete(EqualTo("id", "c"))
    append(table, "f", seq=3)
    table.overwrite(rows("g", "h"), overwrite_filter=EqualTo("id", "a"))


def edited(metadata: TableMetadata, snapshot_id: int, **changes: Any) -> TableMetadata:
    """A copy of ``metadata`` where one snapshot has ``changes`` (e.g. a new summary)."""
    snapshots = [
        s.model_copy(update=changes) if s.snapshot_id == snapshot_id else s
        for s in metadata.snapshots
    ]
    return metadata.model_copy(update={"snapshots": snapshots})


def with_summary(metadata: TableMetadata, snapshot_id: int, **props: str) -> TableMetadata:
    snapshot = metadata.snapshot_by_id(snapshot_id)
    assert snapshot is not None and snapshot.summary is not None
    merged = {**snapshot.summary.additional_properties, **props}
    return edited(metadata, snapshot_id, summary=Summary(snapshot.summary.operation, **merged))


def summary_int(table: Table, snapshot_id: int, key: str) -> int:
    snapshot = table.metadata.snapshot_by_id(snapshot_id)
    assert snapshot is not None and snapshot.summary is not None
    return int(snapshot.summary.additional_properties[key])


def ancestry_ids(table: Table) -> list[int]:
    """Snapshot ids from the current one back to the oldest (newest first)."""
    out = []
    snapshot = table.current_snapshot()
    while snapshot is not None:
        out.append(snapshot.snapshot_id)
        parent = snapshot.parent_snapshot_id
        snapshot = table.metadata.snapshot_by_id(parent) if parent is not None else None
    return out


# --- healthy ---------------------------------------------------------------------------------


def test_a_table_without_snapshots_is_healthy(table: Table) -> None:
    # Given a table that was just created
    # When its lineage is validated
    # Then nothing is wrong
    assert validate_lineage(table) == []


def test_appends_deletes_and_overwrites_make_a_healthy_lineage(table: Table) -> None:
    # Given a history of appends (some carrying a commit-seq), a delete and an overwrite
    healthy_history(table)
    # When the lineage is validated
    problems = validate_lineage(table)
    # Then it is healthy, and the history really has the operations it should
    assert problems == []
    operations = [s.summary.operation for s in table.snapshots() if s.summary]
    assert Operation.DELETE in operations or Operation.OVERWRITE in operations
    assert len(ancestry_ids(table)) >= 6


def test_expiring_the_oldest_snapshots_is_tolerated(table: Table) -> None:
    # Given a healthy history whose two oldest snapshots are expired
    healthy_history(table)
    oldest_two = list(reversed(ancestry_ids(table)))[:2]
    table.maintenance.expire_snapshots().by_ids(oldest_two).commit()
    # When the lineage is validated
    problems = validate_lineage(table)
    # Then the missing parent of the oldest retained snapshot is not a problem
    assert table.metadata.snapshot_by_id(oldest_two[0]) is None
    assert problems == []


# --- broken, made with catalog operations -----------------------------------------------------


def test_a_snapshot_expired_from_the_middle_of_the_history_is_reported(table: Table) -> None:
    # Given three appends whose middle snapshot is expired while the oldest is kept
    append(table, "a", seq=1)
    append(table, "b", seq=2)
    append(table, "c", seq=3)
    newest, middle, oldest = ancestry_ids(table)
    table.maintenance.expire_snapshots().by_id(middle).commit()
    # When the lineage is validated
    problems = validate_lineage(table)
    # Then the gap is reported at the newest snapshot (its parent is gone, yet it is not oldest)
    assert table.metadata.snapshot_by_id(oldest) is not None
    assert len(problems) == 1
    assert f"snapshot {newest} (sequence 3)" in problems[0]
    assert "not the oldest retained snapshot (1 older are kept)" in problems[0]


def test_a_dangling_parent_id_is_tolerated_only_at_the_oldest_snapshot(table: Table) -> None:
    # Given three appends, and in memory (as Java's expiry leaves it) the middle one gone while
    # the newest still names it as parent; then the oldest gone too
    append(table, "a", seq=1)
    append(table, "b", seq=2)
    append(table, "c", seq=3)
    _, middle, oldest = ancestry_ids(table)
    gap = table.metadata.model_copy(
        update={"snapshots": [s for s in table.metadata.snapshots if s.snapshot_id != middle]}
    )
    expired = gap.model_copy(
        update={"snapshots": [s for s in gap.snapshots if s.snapshot_id != oldest]}
    )
    # When both are validated
    problems = validate_metadata(gap)
    # Then the gap is reported with the dangling id, and the trimmed history is healthy
    assert len(problems) == 1 and f"parent {middle} is missing" in problems[0]
    assert validate_metadata(expired) == []


def test_commit_seqs_that_go_backwards_are_reported(table: Table) -> None:
    # Given appends committed by hand with commit-seqs 1, 5, then 3
    append(table, "a", seq=1)
    append(table, "b", seq=5)
    append(table, "c")
    append(table, "d", seq=3)
    # When the lineage is validated
    problems = validate_lineage(table)
    # Then exactly the out-of-order pair is reported
    assert len(problems) == 1
    assert f"{SEQ_PROPERTY}=3 is not above the {SEQ_PROPERTY}=5" in problems[0]


def test_a_watermark_property_behind_the_snapshots_is_reported(table: Table) -> None:
    # Given snapshots with commit-seqs 1 and 2, and a table property that says 1
    append(table, "a", seq=1)
    append(table, "b", seq=2)
    with table.transaction() as tx:
        tx.set_properties({SEQ_PROPERTY: "1"})
    # When the lineage is validated
    problems = validate_lineage(table)
    # Then the stale watermark is reported
    assert problems == [f"table property {SEQ_PROPERTY}=1 is behind the snapshots' 2"]


def test_a_garbled_commit_seq_is_reported(table: Table) -> None:
    # Given a snapshot whose commit-seq is not a number
    table.append(rows("a"), snapshot_properties={SEQ_PROPERTY: "seven"})
    # When the lineage is validated
    problems = validate_lineage(table)
    # Then it is reported
    assert problems == [
        f"snapshot {table.metadata.current_snapshot_id}: {SEQ_PROPERTY} is not a number"
    ]


# --- broken, built in memory -------------------------------------------------------------------


def test_totals_that_do_not_add_up_are_reported(table: Table) -> None:
    # Given a healthy history, and in memory one snapshot whose total-records is off by one
    healthy_history(table)
    newest, parent, *_ = ancestry_ids(table)
    total = summary_int(table, newest, "total-records")
    broken = with_summary(table.metadata, newest, **{"total-records": str(total + 1)})
    # When that metadata is validated
    problems = validate_metadata(broken)
    # Then the arithmetic is reported with the parent it was based on
    assert len(problems) == 1
    assert f"snapshot {newest}: total-records={total + 1}" in problems[0]
    assert f"parent {parent}" in problems[0]


def test_data_file_totals_that_do_not_add_up_are_reported(table: Table) -> None:
    # Given a first snapshot that claims to remove a file although it has no parent
    append(table, "a", seq=1)
    first = ancestry_ids(table)[0]
    broken = with_summary(table.metadata, first, **{"deleted-data-files": "1"})
    # When that metadata is validated
    problems = validate_metadata(broken)
    # Then the first snapshot's totals are checked from zero
    assert len(problems) == 1
    assert "total-data-files=1, but no parent (0)" in problems[0]


def test_a_non_numeric_counter_is_reported(table: Table) -> None:
    # Given a summary whose added-records is not a number
    append(table, "a")
    first = ancestry_ids(table)[0]
    broken = with_summary(table.metadata, first, **{"added-records": "many"})
    # When that metadata is validated
    problems = validate_metadata(broken)
    # Then it is reported, not raised
    assert len(problems) == 1 and "not a whole number" in problems[0]


def test_sequence_numbers_that_do_not_increase_are_reported(table: Table) -> None:
    # Given two appends, and in memory the newer one with its parent's sequence number
    append(table, "a")
    append(table, "b")
    newest, oldest = ancestry_ids(table)
    parent_seq = table.metadata.snapshot_by_id(oldest).sequence_number  # type: ignore[union-attr]
    broken = edited(table.metadata, newest, sequence_number=parent_seq)
    # When that metadata is validated
    problems = validate_metadata(broken)
    # Then the sequence numbers are reported
    assert len(problems) == 1 and "sequence number" in problems[0]


def test_timestamps_may_drift_back_a_little_but_not_more_than_a_minute(table: Table) -> None:
    # Given two appends, and in memory the newer one dated before its parent
    append(table, "a")
    append(table, "b")
    newest, oldest = ancestry_ids(table)
    parent_ms = table.metadata.snapshot_by_id(oldest).timestamp_ms  # type: ignore[union-attr]
    slightly = edited(table.metadata, newest, timestamp_ms=parent_ms - MAX_CLOCK_SKEW_MS + 1)
    far = edited(table.metadata, newest, timestamp_ms=parent_ms - MAX_CLOCK_SKEW_MS - 1)
    # When both are validated
    # Then clock skew within a minute is tolerated and beyond it is reported
    assert validate_metadata(slightly) == []
    problems = validate_metadata(far)
    assert len(problems) == 1 and "timestamp" in problems[0]


def test_an_ancestry_that_loops_is_reported_and_does_not_hang(table: Table) -> None:
    # Given two appends, and in memory the older one pointing at the newer as its parent
    append(table, "a")
    append(table, "b")
    newest, oldest = ancestry_ids(table)
    broken = edited(table.metadata, oldest, parent_snapshot_id=newest)
    # When that metadata is validated
    problems = validate_metadata(broken)
    # Then the loop is reported
    assert any("loops back" in p for p in problems)


def test_a_current_snapshot_that_does_not_exist_is_reported(table: Table) -> None:
    # Given metadata whose current snapshot id names no snapshot
    append(table, "a")
    broken = table.metadata.model_copy(update={"current_snapshot_id": 42})
    # When it is validated
    # Then that is the problem
    assert validate_metadata(broken) == ["current snapshot 42 is not in the table's snapshots"]


# --- exactly once ------------------------------------------------------------------------------


def test_exactly_once_passes_when_every_id_is_there_once(table: Table) -> None:
    # Given a table holding a, b and c
    append(table, "a", "b")
    append(table, "c")
    # When the expected ids are asserted
    # Then it passes, and the counts are what was written
    assert_exactly_once(table, ["a", "b", "c"])
    assert table_ids(table) == {"a": 1, "b": 1, "c": 1}


def test_exactly_once_on_an_empty_table(table: Table) -> None:
    # Given an empty table
    # When nothing is expected, it passes; when something is, it is missing
    assert_exactly_once(table, [])
    with pytest.raises(AssertionError, match="1 missing: a"):
        assert_exactly_once(table, ["a"])


def test_exactly_once_lists_missing_duplicated_and_unexpected_ids(table: Table) -> None:
    # Given a table where b landed twice, x was never expected and c never landed
    append(table, "a", "b")
    append(table, "b", "x")
    # When a, b and c are asserted
    with pytest.raises(AssertionError) as raised:
        assert_exactly_once(table, ["a", "b", "c"])
    # Then the message names each kind of failure
    message = str(raised.value)
    assert "t.events: not exactly once (4 rows, 3 expected ids)" in message
    assert "1 missing: c" in message
    assert "1 duplicated: b x2" in message
    assert "1 unexpected: x" in message


def test_exactly_once_shortens_long_lists(table: Table) -> None:
    # Given 25 expected ids none of which landed
    expected = [f"id-{n:02d}" for n in range(25)]
    append(table, "other")
    # When they are asserted
    # Then the message shows ten and counts the rest
    with pytest.raises(AssertionError, match=r"25 missing: id-00, .*id-09, \.\.\. \(15 more\)"):
        assert_exactly_once(table, expected)
