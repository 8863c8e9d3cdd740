"""Checks that a table's history is consistent and that its rows landed exactly once.

:func:`validate_lineage` reads only table metadata (no data file is opened) and returns the
problems it finds as sentences, an empty list meaning healthy. Along the ancestry of the current
snapshot (newest first):

- every parent exists, except that the oldest retained snapshot may have lost its parent to
  snapshot expiry (a dangling parent id, or, as pyiceberg's expiry leaves it, no parent id and a
  sequence number above 1); the chain has no cycle;
- sequence numbers strictly increase from parent to child (format version 2 and later);
- timestamps never go backwards by more than :data:`MAX_CLOCK_SKEW_MS` (clocks of different
  writers differ a little; more than that is a broken history);
- summaries add up: ``total-records`` is the parent's total plus ``added-records`` minus
  ``deleted-records``, and the same for ``total-data-files`` (a snapshot without a parent starts
  from zero; totals that are absent, or whose parent is expired, cannot be checked);
- ``icefleet.commit-seq`` strictly increases among the snapshots that carry one, and the table
  property of the same name is not behind any of them.

:func:`assert_exactly_once` scans the table and compares its ids with the ones expected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot

from common.commit.committer import SEQ_PROPERTY

MAX_CLOCK_SKEW_MS = 60_000
# (total, added, removed) summary properties that must add up from parent to child.
SUMMARY_COUNTERS = (
    ("total-records", "added-records", "deleted-records"),
    ("total-data-files", "added-data-files", "deleted-data-files"),
)
_SHOWN = 10  # ids shown per category in an exactly-once failure


@dataclass(frozen=True)
class _Link:
    """One snapshot of the ancestry, its parent, and whether an older parent was expired."""

    snapshot: Snapshot
    parent: Snapshot | None
    parent_expired: bool = False


def validate_lineage(table: Table) -> list[str]:
    """The inconsistencies in the ancestry of ``table``'s current snapshot; ``[]`` when healthy."""
    return validate_metadata(table.metadata)


def validate_metadata(metadata: TableMetadata) -> list[str]:
    """:func:`validate_lineage` on table metadata (which tests can build in memory)."""
    problems: list[str] = []
    chain = _ancestry(metadata, problems)
    for link in chain:
        problems.extend(_check_link(metadata, link))
    problems.extend(_check_commit_seqs(metadata, chain))
    return problems


def _order(snapshot: Snapshot) -> tuple[int, int]:
    return (snapshot.sequence_number or 0, snapshot.timestamp_ms)


def _had_parent(metadata: TableMetadata, snapshot: Snapshot) -> bool:
    """Whether a snapshot with no parent in ``metadata`` once had one (since expired).

    Java keeps the dangling parent id; pyiceberg's expiry sets it to None, so a parentless
    snapshot whose sequence number is above the first one's (1) also lost its parent.
    """
    if snapshot.parent_snapshot_id is not None:
        return True
    return metadata.format_version >= 2 and (snapshot.sequence_number or 0) > 1


def _ancestry(metadata: TableMetadata, problems: list[str]) -> list[_Link]:
    """The current snapshot and its ancestors, newest first."""
    current_id = metadata.current_snapshot_id
    if current_id is None or current_id == -1:
        return []
    by_id = {s.snapshot_id: s for s in metadata.snapshots}
    snapshot = by_id.get(current_id)
    if snapshot is None:
        problems.append(f"current snapshot {current_id} is not in the table's snapshots")
        return []
    oldest = min(_order(s) for s in metadata.snapshots)
    chain: list[_Link] = []
    seen: set[int] = set()
    while snapshot is not None:
        if snapshot.snapshot_id in seen:
            problems.append(f"the ancestry loops back to snapshot {snapshot.snapshot_id}")
            break
        seen.add(snapshot.snapshot_id)
        parent_id = snapshot.parent_snapshot_id
        parent = by_id.get(parent_id) if parent_id is not None else None
        expired = parent is None and _had_parent(metadata, snapshot)
        if expired and _order(snapshot) != oldest:
            older = sum(1 for s in metadata.snapshots if _order(s) < _order(snapshot))
            problems.append(
                f"snapshot {snapshot.snapshot_id} (sequence {snapshot.sequence_number}): its "
                f"parent {parent_id if parent_id is not None else '(unrecorded)'} is missing, "
                f"but it is not the oldest retained snapshot ({older} older are kept): the "
                "history has a gap"
            )
        chain.append(_Link(snapshot, parent, expired))
        snapshot = parent
    return chain


def _check_link(metadata: TableMetadata, link: _Link) -> list[str]:
    child, parent = link.snapshot, link.parent
    name = f"snapshot {child.snapshot_id}"
    problems = []
    if parent is not None:
        if metadata.format_version >= 2 and not (
            (child.sequence_number or 0) > (parent.sequence_number or 0)
        ):
            problems.append(
                f"{name}: sequence number {child.sequence_number} is not above its parent "
                f"{parent.snapshot_id}'s {parent.sequence_number}"
            )
        if child.timestamp_ms < parent.timestamp_ms - MAX_CLOCK_SKEW_MS:
            problems.append(
                f"{name}: timestamp {child.timestamp_ms} is "
                f"{parent.timestamp_ms - child.timestamp_ms} ms before its parent "
                f"{parent.snapshot_id}'s (more than {MAX_CLOCK_SKEW_MS} ms)"
            )
    if link.parent_expired:
        return problems  # the parent's totals are gone with it
    for total, added, removed in SUMMARY_COUNTERS:
        problem = _check_total(name, child, parent, total, added, removed)
        if problem is not None:
            problems.append(problem)
    return problems


def _summary_int(snapshot: Snapshot, key: str) -> int | None:
    """The integer value of summary property ``key``; None when absent. ValueError if garbled."""
    if snapshot.summary is None:
        return None
    value = snapshot.summary.additional_properties.get(key)
    return None if value is None else int(value)


def _check_total(
    name: str, child: Snapshot, parent: Snapshot | None, total: str, added: str, removed: str
) -> str | None:
    try:
        child_total = _summary_int(child, total)
        parent_total = 0 if parent is None else _summary_int(parent, total)
        plus = _summary_int(child, added) or 0
        minus = _summary_int(child, removed) or 0
    except ValueError as exc:
        return f"{name}: a summary counter is not a whole number: {exc}"
    if child_total is None or parent_total is None:
        return None  # nothing to compare
    expected = parent_total + plus - minus
    if child_total != expected:
        base = "no parent" if parent is None else f"parent {parent.snapshot_id}"
        return (
            f"{name}: {total}={child_total}, but {base} ({parent_total}) + {added} ({plus}) "
            f"- {removed} ({minus}) = {expected}"
        )
    return None


def _check_commit_seqs(metadata: TableMetadata, chain: list[_Link]) -> list[str]:
    problems = []
    newer: tuple[int, int] | None = None  # (seq, snapshot id) of the nearest newer carrier
    highest = 0
    for link in chain:
        snapshot = link.snapshot
        try:
            seq = _summary_int(snapshot, SEQ_PROPERTY)
        except ValueError:
            problems.append(f"snapshot {snapshot.snapshot_id}: {SEQ_PROPERTY} is not a number")
            continue
        if seq is None:
            continue
        highest = max(highest, seq)
        if newer is not None and not seq < newer[0]:
            problems.append(
                f"snapshot {newer[1]}: {SEQ_PROPERTY}={newer[0]} is not above the "
                f"{SEQ_PROPERTY}={seq} of its ancestor {snapshot.snapshot_id}"
            )
        newer = (seq, snapshot.snapshot_id)
    raw = metadata.properties.get(SEQ_PROPERTY)
    if raw is not None:
        try:
            watermark = int(raw)
        except ValueError:
            return [*problems, f"table property {SEQ_PROPERTY}={raw!r} is not a number"]
        if watermark < highest:
            problems.append(
                f"table property {SEQ_PROPERTY}={watermark} is behind the snapshots' {highest}"
            )
    return problems


# --- data ------------------------------------------------------------------------------------


def table_ids(table: Table, column: str = "id") -> Counter[str]:
    """How many times each value of ``column`` occurs in ``table`` (a full pyiceberg scan)."""
    if table.current_snapshot() is None:
        return Counter()
    arrow = table.scan(selected_fields=(column,)).to_arrow()
    return Counter(str(v) for v in arrow.column(column).to_pylist())


def _preview(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def assert_exactly_once(table: Table, expected_ids: Collection[str], column: str = "id") -> None:
    """Raise AssertionError unless every expected id is in ``table`` once, and nothing else is.

    The message lists missing, duplicated (with their counts) and unexpected ids. The table is
    read as given: refresh or reload it first to see the latest snapshot.
    """
    counts = table_ids(table, column)
    expected = set(expected_ids)
    missing = sorted(expected - counts.keys())
    duplicated = sorted(f"{i} x{n}" for i, n in counts.items() if n > 1)
    unexpected = sorted(counts.keys() - expected)
    if not (missing or duplicated or unexpected):
        return
    parts = []
    for label, items in (
        ("missing", missing),
        ("duplicated", duplicated),
        ("unexpected", unexpected),
    ):
        if items:
            parts.append(f"{len(items)} {label}: {_preview(items)}")
    raise AssertionError(
        f"{'.'.join(table.name())}: not exactly once ({sum(counts.values())} rows, {len(expected)} "
        f"expected ids): " + "; ".join(parts)
    )


__all__ = [
    "MAX_CLOCK_SKEW_MS",
    "assert_exactly_once",
    "table_ids",
    "validate_lineage",
    "validate_metadata",
]
