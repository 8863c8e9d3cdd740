"""Tables read back from outside, and the one exactly-once assertion of the suite.

A pipeline test ends by reading what landed with pyiceberg (:func:`read_ids`) and, where it
matters, with the independent iceberg-rust reader (:func:`rust_ids`), and comparing it with what
was sent (:func:`assert_exactly_once`): every id sent is there once, nothing else is.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from common.ingest.routing import TableName
from common.settings import Settings
from tests.support.events import expected_by_table


def read_ids(table: Table, column: str = "id") -> list[str]:
    """Every value of ``column`` in ``table`` (a full scan with pyiceberg), duplicates included."""
    if table.current_snapshot() is None:
        return []
    arrow = table.scan(selected_fields=(column,)).to_arrow()
    return [str(v) for v in arrow.column(column).to_pylist()]


def rust_ids(table: Table, file_io: dict[str, str] | None = None) -> list[str]:
    """The ids iceberg-rust reads (pyiceberg-core's DataFusion provider), in a process of its own:
    the Rust reader holds the GIL while it waits on S3, which moto may serve from this process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(
            _rust_ids, (list(table.name()), table.metadata_location, dict(file_io or {}))
        )


def _rust_ids(identifier: list[str], metadata_location: str, file_io: dict[str, str]) -> list[str]:
    from datafusion import SessionContext
    from pyiceberg_core.datafusion import IcebergDataFusionTable

    ctx = SessionContext()
    provider = IcebergDataFusionTable(
        identifier=identifier, metadata_location=metadata_location, file_io_properties=file_io
    )
    ctx.register_table("t", provider)
    result = ctx.sql("SELECT id FROM t").to_arrow_table()
    return [str(value) for value in result.column("id").to_pylist()]


def exactly_once_problems(found: Iterable[str], sent: Iterable[str]) -> list[str]:
    """Missing, duplicated and unexpected ids, as sentences; ``[]`` when each is there once."""
    counts = Counter(found)
    wanted = set(sent)
    problems = []
    missing = sorted(wanted - counts.keys())
    duplicated = sorted(f"{i} x{n}" for i, n in counts.items() if n > 1)
    unexpected = sorted(counts.keys() - wanted)
    for label, items in (
        ("missing", missing),
        ("duplicated", duplicated),
        ("unexpected", unexpected),
    ):
        if items:
            problems.append(f"{len(items)} {label}, e.g. {items[:5]}")
    return problems


def assert_exactly_once(found: Table | Iterable[str], sent: Iterable[str], what: str = "") -> None:
    """Every id of ``sent`` is in ``found`` once and nothing else is: same count, same ids, no
    duplicates. ``found`` is a table (read with pyiceberg as it is: reload it first to see the
    latest snapshot) or the ids some reader returned."""
    if isinstance(found, Table):
        what = what or ".".join(found.name())
        found = read_ids(found)
    found, sent = list(found), list(sent)
    problems = exactly_once_problems(found, sent)
    assert not problems, (
        f"{what}: not exactly once ({len(found)} rows read, {len(set(sent))} ids sent): "
        + "; ".join(problems)
    )


def assert_landed_once(
    catalog: Catalog,
    settings: Settings,
    events: Iterable[dict[str, Any]],
    *,
    rust_file_io: dict[str, str] | None = None,
) -> int:
    """Each of ``events`` is in its table (routed by ``settings``) exactly once, as pyiceberg
    reads it, and iceberg-rust too when ``rust_file_io`` is given; returns the rows read."""
    rows = 0
    for name, ids in expected_by_table(settings, events).items():
        table = catalog.load_table(TableName.parse(name).parts)
        found = read_ids(table)
        assert_exactly_once(found, ids, f"{name} (pyiceberg)")
        rows += len(found)
        if rust_file_io is not None:
            assert_exactly_once(rust_ids(table, rust_file_io), ids, f"{name} (iceberg-rust)")
    return rows


def commit_seqs(table: Table) -> list[int]:
    """The commit seq of each snapshot icefleet's committer made, in the table's snapshot order."""
    from common.commit.committer import SEQ_PROPERTY

    return [
        int(s.summary.additional_properties[SEQ_PROPERTY])
        for s in table.snapshots()
        if s.summary is not None and SEQ_PROPERTY in s.summary.additional_properties
    ]


def assert_one_snapshot_per_seq(table: Table) -> None:
    """Commit seqs only grow: no commit landed twice."""
    seqs = commit_seqs(table)
    assert seqs == sorted(set(seqs)), f"{'.'.join(table.name())}: commit seqs {seqs}"


def local_path(uri: str) -> Path:
    """The local path of a ``file://`` URI (or of a plain path)."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else Path(uri)
