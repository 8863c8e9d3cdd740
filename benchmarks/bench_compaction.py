"""Compaction: about 1 GB of small files rewritten into target-size ones, against raw pyarrow.

1. An event table is created the usual way (one batch through :class:`~common.write.batch_writer.BatchWriter`),
   then ``--files`` (500) Parquet files of about ``--file-mb`` (2) MB each are written straight
   with pyarrow, in the table's schema, spread over two days, and registered in ONE fast append
   (as one group commit would): 1 GB of small files, quickly.
2. Timed: :func:`common.maintenance.compaction.compact_table` with the default 128 MiB target, under the
   table's Redis lock (a throwaway ``redis-server``): plan, read every file through the table's
   FileIO, rewrite, swap in ONE ``replace`` snapshot. Rows are counted and the table verified
   afterwards (not timed).
3. Baseline, measured in the same run: the same bins of the same files read with
   ``pyarrow.dataset`` (its own reader threads) and written with ``pyarrow.parquet.write_table``
   (zstd, same row groups, same number of bins at once), with no catalog, no projection onto the
   table schema and no statistics.

The baseline runs once before and once after the compaction; their mean is compared.

Target (design seed): 1 GB in under 60 s. Prints the figures and writes
``benchmarks/results/compaction.json``. Run: ``python -m benchmarks compaction``, or
``python -m benchmarks.bench_compaction --files 500 --file-mb 2``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyiceberg
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table
from pyiceberg.typedef import Record

from benchmarks._shared import write_results
from common.commit.committer import SEQ_PROPERTY, committed_seq, without_library_retries
from common.coord.locks import TableLock
from common.maintenance.compaction import REWRITE_THREADS, compact_table
from common.maintenance.compaction_plan import CompactionOptions, bins, plan_compaction
from common.maintenance.deletes import live_data_files
from common.maintenance.invariants import validate_lineage
from common.maintenance.verify import verify_table
from common.write.datafile_writer import data_file_path, write_data_file
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.services import redis_server
from tests.support.stack import TABLE, Stack, make_stack

TARGET_S = 60.0
MB = 1_048_576
PAYLOAD_BYTES = 300  # random base64 per row: compresses little, like real payloads
DAY0 = datetime(2024, 5, 1, tzinfo=UTC)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_compaction", description=__doc__)
    parser.add_argument("--files", type=int, default=500, help="small files to compact")
    parser.add_argument("--file-mb", type=float, default=2.0, help="approximate size of each")
    parser.add_argument("--target-mb", type=int, default=128, help="compaction target size")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


# --- the small files -------------------------------------------------------------------------


def payload_pool(rows: int, seed: int = 7) -> pa.Array:
    """``rows`` distinct random strings of PAYLOAD_BYTES characters (base64 of random bytes)."""
    import base64

    rng = np.random.default_rng(seed)
    raw = rng.bytes(rows * PAYLOAD_BYTES * 3 // 4)
    text = base64.b64encode(raw).decode()
    return pa.array([text[i * PAYLOAD_BYTES : (i + 1) * PAYLOAD_BYTES] for i in range(rows)])


def column_for(field: pa.Field, n: int, file_no: int, payload: pa.Array) -> pa.Array:
    """Values for one column of one file, by type (so the generator follows schema changes)."""
    name, kind = field.name, field.type
    if name == "id":
        return pa.array([f"f{file_no:05d}-{i}" for i in range(n)], kind)
    if name == "raw_event":
        return payload.cast(kind)
    if pa.types.is_timestamp(kind):
        day = DAY0 + timedelta(days=file_no % 2)
        start = int(day.timestamp() * 1_000_000) + file_no * 1_000
        return pa.array(np.arange(start, start + n, dtype=np.int64), pa.int64()).cast(kind)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = {"specversion": "1.0", "type": "com.example.order", "_batch_id": f"f{file_no}"}
        return pa.array([values.get(name, "/bench")] * n, kind)
    if pa.types.is_integer(kind):
        return pa.array(np.arange(n, dtype=np.int64), pa.int64()).cast(kind)
    if pa.types.is_floating(kind):
        return pa.array(np.arange(n, dtype=np.float64) * 1.5, pa.float64()).cast(kind)
    return pa.nulls(n, kind)  # maps, structs: optional, left empty


def write_small_files(table: Table, files: int, file_mb: float) -> list[DataFile]:
    """``files`` Parquet files in the table's schema, written with pyarrow; their DataFiles."""
    schema = schema_to_pyarrow(table.schema())
    rows = max(1, int(file_mb * MB / (PAYLOAD_BYTES * 0.8)))
    pool = payload_pool(rows * 4)

    def write(file_no: int) -> DataFile:
        offset = (file_no * 7919) % (len(pool) - rows)
        payload = pool.slice(offset, rows)
        arrays = [column_for(f, rows, file_no, payload) for f in schema]
        chunk = pa.Table.from_arrays(arrays, schema=schema)
        day = (DAY0 - datetime(1970, 1, 1, tzinfo=UTC)).days + file_no % 2
        path = data_file_path(table.location(), f"bench-{file_no:05d}", day)
        return write_data_file(
            table, chunk, path, Record(day), row_group_rows=100_000, compression="zstd"
        )

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool_x:
        return list(pool_x.map(write, range(files)))


def register(table: Table, files: list[DataFile]) -> Table:
    """All files in ONE fast append with the next commit seq, as a group commit makes it."""
    seq = str(committed_seq(table) + 1)
    tx = without_library_retries(table).transaction()
    tx.set_properties({SEQ_PROPERTY: seq})
    with tx.update_snapshot(snapshot_properties={SEQ_PROPERTY: seq}).fast_append() as append:
        for data_file in files:
            append.append_data_file(data_file)
    return tx.commit_transaction()


# --- measurements ----------------------------------------------------------------------------


def baseline(table: Table, options: CompactionOptions, out_dir: Path) -> dict[str, Any]:
    """The same bins, rewritten with plain pyarrow: read, concat, write_table (zstd).

    ``table`` is the table as it was before compaction (its files are still there: nothing
    expires them in this benchmark).
    """
    plan = plan_compaction(table, options)
    work = [b for g in plan.groups for b in bins(g.files, options.target_file_size_bytes)]
    out_dir.mkdir(parents=True, exist_ok=True)

    def rewrite(item: tuple[int, list[DataFile]]) -> int:
        n, inputs = item
        # pyarrow.dataset reads the files of a bin on its own threads, as pyiceberg's scan does
        rows = ds.dataset([str(local_path(f.file_path)) for f in inputs], format="parquet")
        rows = rows.to_table()
        target = out_dir / f"baseline-{n}.parquet"
        pq.write_table(rows, target, compression="zstd", row_group_size=100_000)
        return target.stat().st_size

    started = time.perf_counter()
    with ThreadPoolExecutor(REWRITE_THREADS) as pool:
        sizes = list(pool.map(rewrite, enumerate(work)))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "files_in": sum(map(len, work)), "files_out": len(sizes)}


def run(files: int, file_mb: float, target_mb: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-compaction-") as tmp,
        redis_server(Path(tmp) / "redis", appendonly=False) as url,
    ):
        pipe: Stack = make_stack(url, Path(tmp) / "home", lock_ttl_ms=30_000)
        try:
            pipe.write("seed", make_events("seed", 1))  # creates the table (not committed)
            table = pipe.table()
            started = time.perf_counter()
            written = write_small_files(table, files, file_mb)
            table = register(table, written)
            setup_s = time.perf_counter() - started
            total_bytes = sum(f.file_size_in_bytes for f in written)
            total_rows = sum(f.record_count for f in written)
            options = CompactionOptions(target_file_size_bytes=target_mb * MB)

            # The baseline runs before and after the compaction (this machine's noise is a few
            # tens of percent from run to run): the mean of the two is the figure compared.
            before = baseline(table, options, Path(tmp) / "baseline-1")

            lock = TableLock(pipe.client, TABLE, ttl_ms=30_000)
            started = time.perf_counter()
            result = compact_table(table, options, lock=lock)
            compact_s = time.perf_counter() - started

            later = baseline(table, options, Path(tmp) / "baseline-2")
            base = {
                **before,
                "seconds": (before["seconds"] + later["seconds"]) / 2,
                "runs_s": [before["seconds"], later["seconds"]],
            }

            after = pipe.table()
            live = live_data_files(after)
            check = {
                "rows_after": sum(f.record_count for f in live.values()),
                "verify_ok": verify_table(after).ok,
                "lineage_problems": validate_lineage(after),
                "snapshot_operation": after.current_snapshot().summary.operation.value,  # type: ignore[union-attr]
                "commit_seq_unchanged": committed_seq(after) == committed_seq(table),
            }
            assert check["rows_after"] == total_rows, check
            assert check["verify_ok"] and not check["lineage_problems"], check
        finally:
            pipe.close()
    return {
        "benchmark": "compaction",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {
            "files": files,
            "bytes": total_bytes,
            "rows": total_rows,
            "mean_file_mb": total_bytes / files / MB,
            "setup_s": setup_s,
        },
        "target_file_size_mb": target_mb,
        "compaction": {
            "seconds": compact_s,
            "files_before": result.files_before,
            "files_after": result.files_after,
            "rewritten_files": result.rewritten_files,
            "written_files": result.written_files,
            "mb_per_s": total_bytes / MB / compact_s,
        },
        "baseline_raw_pyarrow": base,
        "ratio_compaction_vs_baseline": compact_s / base["seconds"],
        "target_s": TARGET_S,
        "target_met": compact_s < TARGET_S,
        "check": check,
        "environment": {
            "python": platform.python_version(),
            "pyiceberg": pyiceberg.__version__,
            "pyarrow": pa.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": REWRITE_THREADS,
            "catalog": "SQLite (embedded), local file warehouse",
        },
    }


def report(result: dict[str, Any]) -> str:
    inp, comp, base = result["input"], result["compaction"], result["baseline_raw_pyarrow"]
    target = "MET" if result["target_met"] else "MISSED"

    def row(name: str, value: str) -> str:
        return f"  {name:<46}{value}"

    return "\n".join(
        [
            f"compaction of {inp['files']} files, {inp['bytes'] / MB:,.0f} MiB, "
            f"{inp['rows']:,} rows (mean {inp['mean_file_mb']:.2f} MiB/file), target "
            f"{result['target_file_size_mb']} MiB, {result['environment']['cpus']} CPUs",
            row("write + register the small files (setup)", f"{inp['setup_s']:8.1f} s"),
            row(
                "icefleet compact_table (plan, rewrite, swap)",
                f"{comp['seconds']:8.1f} s ({comp['mb_per_s']:.0f} MiB/s; target < "
                f"{result['target_s']:.0f} s: {target})",
            ),
            row("files before -> after", f"{comp['files_before']:>8} -> {comp['files_after']}"),
            row(
                "baseline: raw pyarrow read + write, same bins",
                f"{base['seconds']:8.1f} s ({base['files_in']} -> {base['files_out']} files; "
                f"mean of {base['runs_s'][0]:.1f} s before and {base['runs_s'][1]:.1f} s after)",
            ),
            row("ratio icefleet / baseline", f"{result['ratio_compaction_vs_baseline']:8.2f}x"),
            row(
                "after: rows, verify, lineage, operation",
                f"{result['check']['rows_after']:,} rows, verify "
                f"{'ok' if result['check']['verify_ok'] else 'FAILED'}, lineage "
                f"{'valid' if not result['check']['lineage_problems'] else 'BROKEN'}, "
                f"{result['check']['snapshot_operation']}",
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run(args.files, args.file_mb, args.target_mb)
    print(report(result))
    print(f"  results: {write_results('compaction', result, args.output)}")
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
