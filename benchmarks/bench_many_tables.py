"""Commits that scale with tables: one batch fanning out to many existing tables.

A real local fleet (``workers.fleet.Fleet``: its own ``redis-server``, one writer, a committer
worker of K processes, ``ICEFLEET_COMMIT_CONCURRENCY=K``) and N existing tables (created before
the clock starts, empty). One batch of ``--events`` events whose types spread evenly
over the N tables is enqueued with the producer; the clock stops when every batch is committed
(``common.coord.backlog.Waiter``, polled every 20 ms), i.e. when all N tables show the new rows to
a reader; the rows are then counted from the snapshots and checked. Every committed batch is one
commit per table, each under its table's lock; the writer nudges the tables in groups (8 a commit
task) and each of the K processes commits a task's tables in 8 threads
(workers/tasks/commit.py), so K processes commit up to 8K tables at a time.

Runs per catalog (embedded SQLite and/or PostgreSQL, ``ICEFLEET_TEST_POSTGRES_URL``, a fresh
database made for the run) and per K, interleaved round by round; the baseline is K=1 in the same
run. Target (issue 16): under 3 s for 200 tables with the embedded catalog; near-linear scaling
with K on PostgreSQL (SQLite serialises writers in its file lock). Run:
``python -m benchmarks many_tables`` or
``python -m benchmarks.bench_many_tables --tables 200,1000 --committers 1,2,4 --catalog both``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._shared import environment, median, now_iso, row, verdict, write_results
from common.coord.backlog import Waiter
from common.ingest.producer import Producer
from common.ingest.routing import Router
from common.lake.catalog import TableStore, open_catalog
from common.settings import Settings, load_settings
from common.write.batch_writer import BatchWriter
from tests.support.events import ndjson
from workers.fleet import Fleet

NAME = "many_tables"
TARGET_S_200_EMBEDDED = 3.0
CATALOG = "benchmany"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_many_tables", description=__doc__)
    parser.add_argument("--tables", default="200", help="table counts, comma-separated")
    parser.add_argument("--committers", default="1,4", help="committer processes, comma-separated")
    parser.add_argument(
        "--catalog", choices=("sqlite", "postgres", "both"), default="sqlite", help="catalogs"
    )
    parser.add_argument("--events", type=int, default=5_000, help="events in the batch")
    parser.add_argument("--rounds", type=int, default=2, help="timed batches per K")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per batch")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def events_for(tables: int, count: int, run: str) -> list[dict[str, Any]]:
    return [
        {
            "specversion": "1.0",
            "id": f"{run}-{n}",
            "source": "/bench/many",
            "type": f"com.bench.many.t{n % tables:04d}",
            "time": "2024-05-01T12:00:00Z",
            "data": {"n": n, "label": f"event {n}"},
        }
        for n in range(count)
    ]


@contextlib.contextmanager
def catalog_env(kind: str, home: Path) -> Iterator[None]:
    """``ICEFLEET_*`` and ``PYICEBERG_CATALOG__*`` for the run, in this process and children."""
    saved = dict(os.environ)
    os.environ["ICEFLEET_HOME"] = str(home)
    os.environ.pop("ICEFLEET_REDIS_URL", None)
    try:
        if kind == "sqlite":
            os.environ.pop("ICEFLEET_CATALOG", None)
            yield
            return
        from tests.support.services import POSTGRES_URL_ENV, fresh_postgres_database

        url = os.environ.get(
            POSTGRES_URL_ENV, "postgresql+psycopg2://icefleet:icefleet@127.0.0.1:5432/icefleet_test"
        )
        with fresh_postgres_database(url) as fresh:
            prefix = f"PYICEBERG_CATALOG__{CATALOG.upper()}__"
            os.environ.update(
                {
                    "ICEFLEET_CATALOG": CATALOG,
                    f"{prefix}TYPE": "sql",
                    f"{prefix}URI": fresh,
                    f"{prefix}WAREHOUSE": (home / "warehouse").as_uri(),
                }
            )
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def create_tables(settings: Settings, tables: int) -> float:
    """The N tables, made in this process from one event each, whose files no registry
    keeps (not timed: a setup)."""
    store = TableStore(open_catalog(settings), lambda _t: contextlib.nullcontext())
    writer = BatchWriter(settings, store, Router(settings.routes, settings.namespace))
    started = time.monotonic()
    result = writer.write("setup", ndjson(events_for(tables, tables, "setup")), enqueued_at_ms=0)
    assert len(result.files) == tables, "not every table was created"
    return time.monotonic() - started


def timed_batch(fleet: Fleet, tables: int, count: int, run: str, timeout_s: float) -> float:
    with Producer(fleet.settings) as producer:
        payload = ndjson(events_for(tables, count, run))
        started = time.monotonic()
        producer.enqueue(payload, batch_id=run)
        waiter = Waiter(producer.client, [run])
        while not waiter.poll().done:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{run}: not committed after {timeout_s:.0f}s")
            time.sleep(0.02)
        return time.monotonic() - started


def committed_rows(settings: Settings) -> int:
    catalog = open_catalog(settings)
    total = 0
    for ident in catalog.list_tables(settings.namespace):
        snapshot = catalog.load_table(ident).current_snapshot()
        if snapshot is not None and snapshot.summary is not None:
            total += int(snapshot.summary.additional_properties.get("total-records", 0))
    return total


def run_catalog(
    kind: str, tables: int, committers: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    seconds: dict[int, list[float]] = {k: [] for k in committers}
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-many-") as tmp,
        catalog_env(kind, Path(tmp) / "home"),
    ):
        settings = load_settings()
        setup_s = create_tables(settings, tables)
        expected = 0  # the setup writes files but registers none: the tables start empty
        for r in range(args.rounds):
            order = committers if r % 2 == 0 else committers[::-1]
            for k in order:
                os.environ["ICEFLEET_COMMIT_CONCURRENCY"] = str(k)
                fleet = Fleet(load_settings(), writers=1, loglevel="WARNING")
                try:
                    fleet.start()
                    fleet.wait_ready(timeout_s=180)
                    run = f"r{r}k{k}t{tables}"
                    seconds[k].append(timed_batch(fleet, tables, args.events, run, args.timeout))
                    expected += args.events
                    rows = committed_rows(fleet.settings)
                finally:
                    fleet.stop(idle=True)
                assert rows == expected, f"{rows} rows committed, {expected} expected"
                print(f"  {kind}, {tables} tables, {k} committer(s): {seconds[k][-1]:.2f} s")
    base = median(seconds[committers[0]])
    return {
        "catalog": kind,
        "tables": tables,
        "setup_seconds": setup_s,
        "by_committers": {
            str(k): {"seconds_median": median(v), "seconds_rounds": v} for k, v in seconds.items()
        },
        "ratios": {
            f"speedup_{k}_vs_{committers[0]}": base / median(seconds[k]) for k in committers[1:]
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tables = [int(t) for t in args.tables.split(",") if t]
    committers = [int(k) for k in args.committers.split(",") if k]
    kinds = ("sqlite", "postgres") if args.catalog == "both" else (args.catalog,)
    results = [run_catalog(kind, n, committers, args) for kind in kinds for n in tables]
    return {
        "benchmark": NAME,
        "at": now_iso(),
        "events": args.events,
        "runs": results,
        "environment": environment(catalog=", ".join(kinds)),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"one batch of {result['events']:,} events fanning out to N existing tables, enqueue -> "
        "all committed (median of rounds)"
    ]
    for entry in result["runs"]:
        lines.append(
            f"  {entry['catalog']}, {entry['tables']} tables "
            f"(setup: tables created in {entry['setup_seconds']:.0f} s):"
        )
        for k, v in entry["by_committers"].items():
            figure = f"{v['seconds_median']:8.2f} s"
            if entry["catalog"] == "sqlite" and entry["tables"] == 200:
                met = v["seconds_median"] < TARGET_S_200_EMBEDDED
                figure += f"  (target < {TARGET_S_200_EMBEDDED:.0f} s: {verdict(met)})"
            lines.append(row(f"    {k} committer process(es)", figure))
        for name, ratio in entry["ratios"].items():
            lines.append(row(f"    {name.replace('_', ' ')}", f"{ratio:8.2f}x"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run(args)
    print(report(result))
    print(f"  results: {write_results(NAME, result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
