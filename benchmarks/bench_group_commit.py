"""Group commit: 1,000 small files in ONE snapshot, against plain pyiceberg in the same run.

1. 1,000 batches of a few events go through :class:`~common.write.batch_writer.BatchWriter`: one small Parquet
   file each, registered as pending in Redis (a throwaway ``redis-server`` on a free port).
2. Timed: ONE ``Committer.commit_table``, which commits all of them in one snapshot with the whole
   exactly-once protocol (lock, watermark, prepared record, file checks, finish).
3. Baselines, each into a fresh table of the same schema, measured here and now:
   - the same 1,000 prebuilt DataFiles in one plain pyiceberg ``fast_append`` (no protocol);
   - ``table.add_files`` of the same 1,000 paths (pyiceberg re-reads every footer);
   - one plain ``table.append`` per file (the rows of each file): the first ``--appends``
     (default 200) are measured and the rest extrapolated, since each commit gets slower as
     snapshots pile up (a straight-line fit of per-append time against snapshot count).

Target (design seed): the 1,000-file snapshot in under 500 ms. Prints a table and writes
``benchmarks/results/group_commit.json``. Run: ``python -m benchmarks group_commit``, or
``python -m benchmarks.bench_group_commit --files 1000 --appends 1000`` for the full baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pyiceberg
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from benchmarks._shared import write_results
from common.lake.catalog import TABLE_PROPERTIES
from common.maintenance.invariants import validate_lineage
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.services import redis_server
from tests.support.stack import TABLE, Stack, make_stack

TARGET_MS = 500.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_group_commit", description=__doc__)
    parser.add_argument("--files", type=int, default=1000, help="files in the group commit")
    parser.add_argument("--events", type=int, default=5, help="events per file")
    parser.add_argument(
        "--appends", type=int, default=200, help="plain appends measured (rest extrapolated)"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - started) * 1000


def fresh_table(pipe: Stack, like: Table, name: str) -> Table:
    """An empty table with ``like``'s schema, partitioning and properties."""
    from contextlib import suppress

    from pyiceberg.exceptions import NamespaceAlreadyExistsError

    with suppress(NamespaceAlreadyExistsError):
        pipe.catalog.create_namespace("baseline")
    table = pipe.catalog.create_table(
        ("baseline", name),
        schema=like.schema(),
        partition_spec=like.spec(),
        properties=TABLE_PROPERTIES,
    )
    if table.schema() != like.schema():  # field ids reassigned: stats would not line up
        print(f"  note: baseline.{name} got different field ids than {TABLE}", file=sys.stderr)
    return table


def write_files(pipe: Stack, files: int, events: int) -> tuple[list[DataFile], float]:
    data_files: list[DataFile] = []

    def write_all() -> None:
        for n in range(files):
            batch = f"bench{n:05d}"
            # Spread over days so partitions vary, as a real stream's would.
            result = pipe.write(batch, make_events(batch, events, day_offset=n % 7))
            data_files.extend(result.files[TABLE])

    _, ms = timed(write_all)
    return data_files, ms


def bench_group_commit(pipe: Stack, files: int) -> dict[str, Any]:
    pending = len(pipe.registry.pending_entries(TABLE))
    results, ms = timed(pipe.commit)
    table = pipe.table()
    assert len(results) == 1, f"expected one snapshot, got {len(results)}"
    assert results[0].files == files and pending == files, (results[0], pending)
    problems = validate_lineage(table)
    assert problems == [], problems
    return {
        "wall_ms": ms,
        "committer_ms": results[0].duration_ms,
        "snapshots": len(results),
        "files": results[0].files,
        "records": results[0].records,
        "attempts": results[0].attempts,
    }


def bench_fast_append(pipe: Stack, like: Table, data_files: list[DataFile]) -> float:
    table = fresh_table(pipe, like, "fast_append")

    def commit() -> None:
        with table.transaction() as tx, tx.update_snapshot().fast_append() as append:
            for data_file in data_files:
                append.append_data_file(data_file)

    _, ms = timed(commit)
    return ms


def bench_add_files(pipe: Stack, like: Table, data_files: list[DataFile]) -> float | str:
    table = fresh_table(pipe, like, "add_files")
    try:
        _, ms = timed(lambda: table.add_files([f.file_path for f in data_files]))
    except Exception as exc:  # report why the baseline could not run, keep the others
        return f"not measurable: {type(exc).__name__}: {str(exc)[:200]}"
    return ms


def bench_appends(
    pipe: Stack, like: Table, data_files: list[DataFile], measured: int
) -> dict[str, Any]:
    table = fresh_table(pipe, like, "appends")
    schema = table.schema().as_arrow()
    chunks: list[pa.Table] = [
        pq.read_table(local_path(f.file_path)).select(schema.names).cast(schema)
        for f in data_files[:measured]
    ]
    per_append: list[float] = []
    for chunk in chunks:
        _, ms = timed(lambda chunk=chunk: table.append(chunk))
        per_append.append(ms)
    total = len(data_files)
    measured_ms = sum(per_append)
    # Straight-line fit t(i) = a + b*i of the i-th append's time, summed to `total` appends.
    n = len(per_append)
    mean_i = (n - 1) / 2
    mean_t = measured_ms / n
    var_i = sum((i - mean_i) ** 2 for i in range(n)) or 1.0
    slope = sum((i - mean_i) * (t - mean_t) for i, t in enumerate(per_append)) / var_i
    intercept = mean_t - slope * mean_i
    fitted_total = total * intercept + slope * total * (total - 1) / 2
    tail = per_append[-min(20, n) :]
    return {
        "measured_appends": n,
        "measured_ms": measured_ms,
        "first_append_ms": per_append[0],
        "last_appends_mean_ms": sum(tail) / len(tail),
        "ms_per_append_growth_per_snapshot": slope,
        "total_appends": total,
        "total_ms": measured_ms if n == total else max(fitted_total, measured_ms),
        "total_is_extrapolated": n < total,
        "extrapolation": None
        if n == total
        else f"{n} measured, {total - n} extrapolated by a straight-line fit of "
        "per-append time against snapshot count",
    }


def run(files: int, events: int, appends: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-") as tmp,
        redis_server(Path(tmp) / "redis", appendonly=False) as url,
    ):
        pipe = make_stack(
            url,
            Path(tmp) / "home",
            lock_ttl_ms=30_000,
            retry_base_ms=100,
            commit_max_files=max(files, 1),
        )
        try:
            data_files, write_ms = write_files(pipe, files, events)
            group = bench_group_commit(pipe, files)
            like = pipe.table()
            fast_ms = bench_fast_append(pipe, like, data_files)
            add_files = bench_add_files(pipe, like, data_files)
            plain = bench_appends(pipe, like, data_files, min(appends, files))
        finally:
            pipe.close()
    group_ms = group["wall_ms"]
    return {
        "benchmark": "group_commit",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
        "events_per_file": events,
        "write": {"ms": write_ms, "ms_per_batch": write_ms / files},
        "group_commit": group,
        "target_ms": TARGET_MS,
        "target_met": group_ms < TARGET_MS,
        "baseline": {
            "fast_append_same_datafiles_ms": fast_ms,
            "add_files_same_paths_ms": add_files,
            "one_append_per_file": plain,
        },
        "ratios": {
            "appends_vs_group_commit": plain["total_ms"] / group_ms,
            "group_commit_vs_fast_append": group_ms / fast_ms,
            "add_files_vs_group_commit": add_files / group_ms
            if isinstance(add_files, float)
            else None,
        },
        "environment": {
            "python": platform.python_version(),
            "pyiceberg": pyiceberg.__version__,
            "pyarrow": pa.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "catalog": "SQLite (embedded), local file warehouse",
        },
    }


def report(result: dict[str, Any]) -> str:
    group, base = result["group_commit"], result["baseline"]
    plain, ratios = base["one_append_per_file"], result["ratios"]
    files, env = result["files"], result["environment"]
    add_files = base["add_files_same_paths_ms"]
    label = "extrapolated" if plain["total_is_extrapolated"] else "measured"
    target = "MET" if result["target_met"] else "MISSED"

    def row(name: str, value: str) -> str:
        return f"  {name:<44}{value}"

    lines = [
        f"group commit of {files} files x {result['events_per_file']} events "
        f"(pyiceberg {env['pyiceberg']}, {env['catalog']})",
        row(
            f"write + register {files} batches",
            f"{result['write']['ms']:9.1f} ms ({result['write']['ms_per_batch']:.2f} ms/batch)",
        ),
        row(
            "icefleet commit_table, ONE snapshot",
            f"{group['wall_ms']:9.1f} ms (target < {result['target_ms']:.0f} ms: {target})",
        ),
        "  baselines, same files, plain pyiceberg, fresh tables:",
        row(
            "  fast_append of the same DataFiles",
            f"{base['fast_append_same_datafiles_ms']:9.1f} ms",
        ),
        row(
            "  add_files of the same paths",
            f"{add_files:9.1f} ms" if isinstance(add_files, float) else str(add_files),
        ),
        row(
            f"  {plain['measured_appends']} appends, one per file, measured",
            f"{plain['measured_ms']:9.1f} ms (first {plain['first_append_ms']:.1f} ms, "
            f"last {plain['last_appends_mean_ms']:.1f} ms each)",
        ),
        row(f"  {files} appends, one per file, {label}", f"{plain['total_ms']:9.1f} ms"),
    ]
    if plain["extrapolation"]:
        lines.append(f"      ({plain['extrapolation']})")
    lines += [
        "  ratios:",
        row(
            f"  {files} appends / group commit",
            f"{ratios['appends_vs_group_commit']:9.1f}x ({label})",
        ),
        row(
            "  group commit / bare fast_append",
            f"{ratios['group_commit_vs_fast_append']:9.2f}x (cost of the exactly-once protocol)",
        ),
    ]
    if ratios["add_files_vs_group_commit"] is not None:
        lines.append(
            row("  add_files / group commit", f"{ratios['add_files_vs_group_commit']:9.2f}x")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run(args.files, args.events, args.appends)
    print(report(result))
    print(f"  results: {write_results('group_commit', result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
