"""Peak memory (RSS) of a writer process writing 10,000-event batches, against the baselines.

Each contender runs in a fresh Python process (``python -m benchmarks.bench_memory --child
KIND``), so its peak is its own: it imports what it needs, records its RSS, writes ``--batches``
batches of ``--size`` events (the ``order_placed`` events of ``bench_writer``, ~4.9 MB of NDJSON
per 10,000) and reports its peak RSS (``VmHWM``; not ``ru_maxrss``, which Linux carries over
``exec`` from the parent) and its RSS after each batch (``VmRSS``), from ``/proc``.

- **icefleet**: ``BatchWriter.write`` with the pending registry on a real ``redis-server``;
- **plain pyiceberg** (baseline): ``orjson`` per line, ``pa.Table.from_pylist``, ``table.append``;
- **raw ceiling**: ``orjson`` per line, ``pa.Table.from_pylist``, ``pq.write_table``;
- **imports only**: the same imports as icefleet's contender, no batch: the floor.

"Batch working set" = peak minus the RSS after imports. The real worker process also holds the
Celery message (the payload, JSON-escaped and base64-encoded by the Redis transport): the fleet
benchmark reports the peak RSS of real writer processes. The seed gives no target. Run:
``python -m benchmarks memory`` or ``python -m benchmarks.bench_memory --size 10000``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._shared import environment, now_iso, peak_rss_mb, row, write_results
from tests.support.services import redis_server

NAME = "memory"
KINDS = ("imports_only", "icefleet", "plain_pyiceberg", "raw_ceiling")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_memory", description=__doc__)
    parser.add_argument("--size", type=int, default=10_000, help="events per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches per process")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - not Linux


def child(kind: str, size: int, batches: int, redis_url: str, home: Path) -> dict[str, Any]:
    """Runs in the child process: import, write, measure."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.bench_writer import order_events, plain_rows
    from common.lake.catalog import TABLE_PROPERTIES
    from tests.support.events import ndjson
    from tests.support.stack import make_stack

    payload = ndjson(order_events(size, run_id="mem"))
    pipe = make_stack(redis_url, home / kind)
    after_imports = current_rss_mb()
    write: Any
    if kind == "icefleet":

        def write(n: int) -> None:
            pipe.writer.write(f"mem-{n}", payload, enqueued_at_ms=int(time.time() * 1000))

    elif kind == "plain_pyiceberg":
        pipe.catalog.create_namespace_if_not_exists("plain")
        schema = pa.Table.from_pylist(plain_rows(payload)).schema
        table = pipe.catalog.create_table(
            ("plain", "memory"), schema=schema, properties=TABLE_PROPERTIES
        )
        after_imports = current_rss_mb()

        def write(n: int) -> None:
            table.append(pa.Table.from_pylist(plain_rows(payload), schema=schema))

    elif kind == "raw_ceiling":
        (home / "raw").mkdir(parents=True, exist_ok=True)

        def write(n: int) -> None:
            rows = pa.Table.from_pylist(plain_rows(payload))
            pq.write_table(rows, home / "raw" / f"{n}.parquet", compression="zstd")

    else:

        def write(n: int) -> None:
            return None

    after_batch = []
    for n in range(batches):
        write(n)
        after_batch.append(current_rss_mb())
    pipe.close()
    return {
        "kind": kind,
        "payload_mb": len(payload.encode()) / 2**20,
        "rss_after_imports_mb": after_imports,
        "rss_after_each_batch_mb": after_batch,
        "peak_rss_mb": peak_rss_mb(),
    }


def run(size: int, batches: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-memory-") as tmp,
        redis_server(Path(tmp) / "redis", appendonly=False) as url,
    ):
        for kind in KINDS:
            argv = [
                sys.executable, "-m", "benchmarks.bench_memory", "--child", kind,
                "--size", str(size), "--batches", str(batches),
                "--redis-url", url, "--home", str(Path(tmp) / "home"),
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{kind} child failed:\n{done.stderr[-2000:]}")
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    floor = results["imports_only"]["peak_rss_mb"]
    for value in results.values():
        value["batch_working_set_mb"] = value["peak_rss_mb"] - value["rss_after_imports_mb"]
    ours = results["icefleet"]["peak_rss_mb"]
    return {
        "benchmark": NAME,
        "at": now_iso(),
        "events_per_batch": size,
        "batches": batches,
        "processes": results,
        "ratios": {
            "icefleet_vs_plain_peak": ours / results["plain_pyiceberg"]["peak_rss_mb"],
            "icefleet_vs_raw_peak": ours / results["raw_ceiling"]["peak_rss_mb"],
            "icefleet_over_imports_mb": ours - floor,
        },
        "target": None,
        "environment": environment(),
    }


def report(result: dict[str, Any]) -> str:
    procs = result["processes"]
    lines = [
        f"peak RSS of one process writing {result['batches']} batches of "
        f"{result['events_per_batch']:,} events ({procs['icefleet']['payload_mb']:.1f} MiB "
        "NDJSON each)"
    ]
    labels = {
        "icefleet": "icefleet BatchWriter.write",
        "plain_pyiceberg": "plain pyiceberg append (baseline)",
        "raw_ceiling": "raw ceiling",
        "imports_only": "imports only (floor)",
    }
    for kind in ("icefleet", "plain_pyiceberg", "raw_ceiling", "imports_only"):
        p = procs[kind]
        lines.append(
            row(
                f"  {labels[kind]}",
                f"{p['peak_rss_mb']:7.0f} MiB peak  ({p['rss_after_imports_mb']:.0f} after "
                f"imports, +{p['batch_working_set_mb']:.0f} for batches)",
            )
        )
    ratios = result["ratios"]
    lines += [
        row("  icefleet / plain pyiceberg, peak", f"{ratios['icefleet_vs_plain_peak']:9.2f}x"),
        row("  icefleet / raw ceiling, peak", f"{ratios['icefleet_vs_raw_peak']:9.2f}x"),
        "  (no seed target for memory)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.batches, args.redis_url, args.home)))
        return 0
    result = run(args.size, args.batches)
    print(report(result))
    print(f"  results: {write_results(NAME, result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
