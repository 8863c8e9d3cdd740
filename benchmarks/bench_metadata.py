"""Metadata: ``load_table`` latency over 100 tables, and 1,000 concurrent loads, SQLite catalog.

Setup (not timed): ``--tables`` event tables (default 100) in the embedded SQLite catalog, each
created by icefleet's writer and given ``--snapshots`` commits (default 5) through the committer,
so each has a realistic schema, partition spec, properties and snapshot history.

Timed, in the same run:

1. **load latency**: every table loaded ``--rounds`` times (tables in a shuffled order each round)
   by plain pyiceberg ``catalog.load_table`` (the baseline, what any reader pays) and by icefleet's
   ``TableStore.load``, both cold (``fresh=True``: what a writer pays when its 30 s cache expires:
   an existence check, then the load) and warm (what a writer pays per batch: its cache). p50 and
   p95 over all loads. Target (issue 8): p95 under 100 ms.
2. **1,000 concurrent loads**: ``--concurrent`` threads (default 1,000), each loading one table
   (round robin) with its own ``catalog.load_table`` on the shared catalog, all released at once
   by a barrier; wall time until all are done, and errors. Baseline: the same 1,000 loads one
   after the other in one thread. Target (issue 8): under 5 s.

Run: ``python -m benchmarks metadata`` or
``python -m benchmarks.bench_metadata --tables 100 --rounds 5 --concurrent 1000``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._shared import (
    environment,
    median,
    now_iso,
    percentile,
    row,
    verdict,
    write_results,
)
from common.ingest.routing import TableName
from tests.support.events import make_events
from tests.support.services import redis_server
from tests.support.stack import Stack, make_stack

NAME = "metadata"
TARGET_P95_MS = 100.0
TARGET_CONCURRENT_S = 5.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_metadata", description=__doc__)
    parser.add_argument("--tables", type=int, default=100, help="tables in the catalog")
    parser.add_argument("--snapshots", type=int, default=5, help="commits per table")
    parser.add_argument("--rounds", type=int, default=5, help="loads of every table, per way")
    parser.add_argument("--concurrent", type=int, default=1_000, help="concurrent loads")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def make_tables(pipe: Stack, tables: int, snapshots: int) -> list[TableName]:
    names = []
    for t in range(tables):
        event_type = f"com.example.bench.metadata_{t:04d}"
        table = str(pipe.writer.router.table_for(event_type))
        for s in range(snapshots):
            batch = f"meta-{t:04d}-{s:02d}"
            pipe.write(batch, make_events(batch, 3, types=(event_type,), day_offset=s))
            pipe.commit(table)
        names.append(TableName.parse(table))
    return names


def latencies(names: list[TableName], rounds: int, load: Callable[[TableName], Any]) -> list[float]:
    out = []
    rng = random.Random(7)
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            started = time.perf_counter()
            table = load(name)
            out.append((time.perf_counter() - started) * 1000)
            assert table is not None
    return out


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "loads": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "max_ms": max(ms),
    }


def concurrent_loads(pipe: Stack, names: list[TableName], count: int) -> dict[str, Any]:
    barrier = threading.Barrier(count + 1)
    errors: list[str] = []
    done_ms: list[float] = []
    lock = threading.Lock()
    started = 0.0

    def worker(n: int) -> None:
        barrier.wait()
        try:
            pipe.catalog.load_table(names[n % len(names)].parts)
        except Exception as exc:  # report, do not hide: a failed load is a result
            with lock:
                errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")
        with lock:
            done_ms.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    return {
        "loads": count,
        "threads": count,
        "wall_s": wall_s,
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "completion_p50_ms": median(done_ms),
        "completion_p95_ms": percentile(done_ms, 95),
    }


def serial_loads(pipe: Stack, names: list[TableName], count: int) -> dict[str, Any]:
    started = time.perf_counter()
    for n in range(count):
        pipe.catalog.load_table(names[n % len(names)].parts)
    return {"loads": count, "wall_s": time.perf_counter() - started}


def run(tables: int, snapshots: int, rounds: int, concurrent: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-metadata-") as tmp,
        redis_server(Path(tmp) / "redis", appendonly=False) as url,
    ):
        pipe = make_stack(url, Path(tmp) / "home", lock_ttl_ms=30_000)
        try:
            setup_started = time.monotonic()
            names = make_tables(pipe, tables, snapshots)
            setup_s = time.monotonic() - setup_started
            store = pipe.store
            plain = latencies(names, rounds, lambda n: pipe.catalog.load_table(n.parts))
            cold = latencies(names, rounds, lambda n: store.load(n, fresh=True))
            warm = latencies(names, rounds, store.load)
            together = concurrent_loads(pipe, names, concurrent)
            one_by_one = serial_loads(pipe, names, concurrent)
            metadata_bytes = sorted(
                Path(pipe.catalog.load_table(n.parts).metadata_location.removeprefix("file://"))
                .stat()
                .st_size
                for n in names
            )
        finally:
            pipe.close()
    p95 = summary(plain)["p95_ms"]
    return {
        "benchmark": NAME,
        "at": now_iso(),
        "tables": tables,
        "snapshots_per_table": snapshots,
        "setup_s": setup_s,
        "metadata_json_bytes_median": median(metadata_bytes),
        "load_table": {
            "plain_pyiceberg": summary(plain),
            "icefleet_store_cold": summary(cold),
            "icefleet_store_warm": summary(warm),
            "target_p95_ms": TARGET_P95_MS,
            "target_met": p95 < TARGET_P95_MS,
        },
        "concurrent": {
            "threads": together,
            "serial_baseline": one_by_one,
            "ratio_serial_to_concurrent": one_by_one["wall_s"] / together["wall_s"],
            "target_s": TARGET_CONCURRENT_S,
            "target_met": together["wall_s"] < TARGET_CONCURRENT_S and together["errors"] == 0,
        },
        "environment": environment(),
    }


def report(result: dict[str, Any]) -> str:
    loads, conc = result["load_table"], result["concurrent"]
    threads, serial = conc["threads"], conc["serial_baseline"]

    def line(label: str, s: dict[str, float]) -> str:
        return row(
            f"  {label}",
            f"p50 {s['p50_ms']:6.2f} ms  p95 {s['p95_ms']:6.2f} ms  max {s['max_ms']:6.1f} ms",
        )

    return "\n".join(
        [
            f"metadata: {result['tables']} tables x {result['snapshots_per_table']} snapshots, "
            f"SQLite catalog (metadata JSON ~{result['metadata_json_bytes_median'] / 1024:.0f} "
            f"KiB), {loads['plain_pyiceberg']['loads']} loads per way",
            line("catalog.load_table (plain pyiceberg)", loads["plain_pyiceberg"]),
            line("TableStore.load, cold (cache expired)", loads["icefleet_store_cold"]),
            line("TableStore.load, warm (per batch)", loads["icefleet_store_warm"]),
            row(
                "  load_table p95",
                f"{loads['plain_pyiceberg']['p95_ms']:9.2f} ms (target < "
                f"{loads['target_p95_ms']:.0f} ms: {verdict(loads['target_met'])})",
            ),
            row(
                f"  {threads['loads']:,} concurrent loads ({threads['threads']} threads)",
                f"{threads['wall_s']:9.2f} s, {threads['errors']} errors (target < "
                f"{conc['target_s']:.0f} s: {verdict(conc['target_met'])})",
            ),
            row(
                f"  {serial['loads']:,} loads one by one (baseline)",
                f"{serial['wall_s']:9.2f} s (concurrent is "
                f"{conc['ratio_serial_to_concurrent']:.2f}x the serial rate)",
            ),
        ]
        + [f"    error: {e}" for e in threads["first_errors"]]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run(args.tables, args.snapshots, args.rounds, args.concurrent)
    print(report(result))
    print(f"  results: {write_results(NAME, result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
