"""Continuous validation: a deep verify of a few files per run, rotating through every table.

Beat runs :func:`sample_verify` every ``ICEFLEET_VERIFY_INTERVAL`` (10m) with a budget of
``ICEFLEET_VERIFY_SAMPLE_FILES`` (20) files, so the cost per run is bounded whatever the size of
the warehouse, and every live file is read again within (live files / budget) intervals. Where it
goes on is kept in Redis (:func:`common.coord.keys.verify_cursor`): the table it is in and, per
table, the last file it checked, by path order. Files come and go between runs (commits,
compaction): a path order cursor skips none of those that stay.

Each run records its result (:func:`common.coord.keys.verify_last`: when, how many files, which
were bad and why) and adds the bad files to a counter (:func:`common.coord.keys.verify_failures`),
which the metrics export as ``icefleet_verify_failures_total`` and ``icefleet status`` shows
beside the canary. A bad file is not quarantined automatically: that removes rows from a table,
an operator's decision (docs/integrity.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis
from pyiceberg.table import Table

from common.coord import keys
from common.coord.replies import as_text
from common.maintenance.verify import VerifyReport, live_files, verify_table

logger = logging.getLogger(__name__)

MAX_RECORDED_PROBLEMS = 20


@dataclass
class SampleRun:
    """One run of the sampled validation."""

    checked_ms: int
    files: int = 0
    failures: int = 0
    tables: list[str] = field(default_factory=list)
    bad_files: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # tables that could not be read at all
    duration_s: float = 0.0


def choose(
    tables: Sequence[str],
    files_of: Callable[[str], list[str]],
    cursor: dict[str, str],
    budget: int,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Up to ``budget`` files, going on from ``cursor``; the files by table, and the new cursor.

    Tables are taken in order starting with ``cursor["table"]``; in each, the files after the
    last one checked (by path). A table whose files run out resets its position and hands over
    to the next; every table is visited at most once per run.
    """
    if not tables or budget <= 0:
        return {}, dict(cursor)
    ordered = sorted(tables)
    start = ordered.index(cursor["table"]) if cursor.get("table") in ordered else 0
    new = {k: v for k, v in cursor.items() if k == "table" or k in ordered}
    chosen: dict[str, list[str]] = {}
    left = budget
    for step in range(len(ordered)):
        table = ordered[(start + step) % len(ordered)]
        after = new.get(table, "")
        rest = [path for path in sorted(files_of(table)) if path > after]
        taken = rest[:left]
        if taken:
            chosen[table] = taken
            left -= len(taken)
        if len(taken) < len(rest):  # budget spent inside this table: resume here next time
            new[table] = taken[-1]
            new["table"] = table
            return chosen, new
        new[table] = ""  # this table is done: start it over on the next visit
        new["table"] = ordered[(start + step + 1) % len(ordered)]
        if left == 0:
            break
    return chosen, new


def sample_verify(
    client: redis.Redis,
    tables: Sequence[str],
    load: Callable[[str], Table],
    budget: int,
    *,
    clock: Callable[[], float] = time.time,
) -> SampleRun:
    """Deep-verify up to ``budget`` live files, going on where the last run stopped."""
    started = time.monotonic()
    run = SampleRun(checked_ms=int(clock() * 1000))
    loaded: dict[str, Table] = {}

    def files_of(name: str) -> list[str]:
        try:
            loaded[name] = load(name)
            return [f.file_path for f in live_files(loaded[name], VerifyReport(name))]
        except Exception as exc:  # one table's trouble must not stop the rotation
            run.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            return []

    raw = client.hgetall(keys.verify_cursor())
    cursor = {as_text(k): as_text(v) for k, v in raw.items()}
    chosen, cursor = choose(tables, files_of, cursor, budget)
    for name, paths in chosen.items():
        report = verify_table(loaded[name], deep=True, only=set(paths))
        run.tables.append(name)
        run.files += report.checked
        for path in report.bad_files:
            problems = [p for p in report.problems if p.startswith(path)]
            run.bad_files.append({"table": name, "file": path, "problems": problems})
    run.failures = len(run.bad_files)
    run.bad_files = run.bad_files[:MAX_RECORDED_PROBLEMS]
    run.duration_s = round(time.monotonic() - started, 3)
    pipe = client.pipeline(transaction=True)
    if cursor:
        pipe.delete(keys.verify_cursor())
        pipe.hset(keys.verify_cursor(), mapping=dict(cursor.items()))
    pipe.incrby(keys.verify_failures(), run.failures)
    pipe.set(keys.verify_last(), orjson.dumps(asdict(run)))
    pipe.execute()
    for bad in run.bad_files:
        logger.error(
            "validation: %s is bad: %s",
            bad["file"],
            "; ".join(bad["problems"]),
            extra={"table": bad["table"]},
        )
    logger.info(
        "validation: %d file(s) of %d table(s) verified, %d bad",
        run.files,
        len(run.tables),
        run.failures,
    )
    return run


def last_run(client: redis.Redis) -> dict[str, Any] | None:
    """The last run's record, with the failures counted so far, or None before the first."""
    raw, total = client.mget(keys.verify_last(), keys.verify_failures())
    if raw is None:
        return None
    record: dict[str, Any] = orjson.loads(raw)
    record["failures_total"] = int(total or 0)
    return record


__all__ = ["SampleRun", "choose", "last_run", "sample_verify"]
