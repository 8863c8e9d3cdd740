"""Commit latency as a table ages: the 10th, 100th, 1,000th (and 10,000th) commit, with and
without snapshot expiry, in the same run.

Each step writes ONE small file (one batch of one event, through ``BatchWriter`` and a real
``redis-server``) and times ONE ``Committer.commit_table``: lock, watermark, prepared record, one
fast-append snapshot, finish. Two tables, the same steps:

- **expiry on**: every ``--expire-every`` commits, ``common.maintenance.expiry.expire_snapshots`` keeps the
  newest ``--retain`` snapshots (``older_than_s=0``) and deletes what only the expired ones
  referenced; its time is reported apart (it is maintenance, not the commit);
- **expiry off** (the baseline): snapshots pile up, as they do for a table nobody expires.

A commit's latency at age *n* is the median of the commits within 10 (or *n*/10, whichever is
more) of it. The series stop at
``--commits`` or after ``--max-seconds`` each, whichever comes first; when the 10,000th commit
was not reached, its latency is extrapolated by a straight line through the second half of the
series, and labelled so. Target (issue 8): with expiry on, the 10,000th commit within 2x of the
10th. Run: ``python -m benchmarks commit_aging``, or for the full run
``python -m benchmarks.bench_commit_aging --commits 10000 --max-seconds 3600``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._shared import environment, median, now_iso, row, verdict, write_results
from common.coord.locks import TableLock
from tests.support.events import make_events
from tests.support.services import redis_server
from tests.support.stack import Stack, make_stack

NAME = "commit_aging"
TARGET_RATIO = 2.0
CHECKPOINTS = (10, 100, 1_000, 10_000)
WINDOW = 10
SERIES = {
    "expiry_on": "com.example.bench.aging_expiry_on",
    "expiry_off": "com.example.bench.aging_expiry_off",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_commit_aging", description=__doc__)
    parser.add_argument("--commits", type=int, default=1_000, help="commits per series (at most)")
    parser.add_argument(
        "--max-seconds", type=float, default=150.0, help="time budget per series, seconds"
    )
    parser.add_argument(
        "--max-seconds-off",
        type=float,
        default=None,
        help="time budget of the expiry-off series (default: --max-seconds)",
    )
    parser.add_argument("--expire-every", type=int, default=10, help="commits between expiries")
    parser.add_argument("--retain", type=int, default=10, help="snapshots expiry keeps")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def expire(pipe: Stack, table: str, retain: int) -> dict[str, Any]:
    """Expire all but the newest ``retain`` snapshots of ``table``; what it did."""
    try:
        from common.maintenance.expiry import ExpiryPolicy, expire_snapshots
    except (
        ImportError
    ):  # pragma: no cover - before common/maintenance/expiry.py existed: metadata only
        loaded = pipe.table(table)
        keep = {s.snapshot_id for s in loaded.snapshots()[-retain:]}
        old = [s.snapshot_id for s in loaded.snapshots() if s.snapshot_id not in keep]
        if old:
            loaded.maintenance.expire_snapshots().by_ids(old).commit()
        return {"expired": len(old), "deleted_files": 0}
    lock = TableLock(pipe.client, table, ttl_ms=30_000, wait_s=30)
    report = expire_snapshots(
        pipe.table(table),
        ExpiryPolicy(older_than_s=0, retain_last=retain),
        lock=lock,
        registry=pipe.registry,
    )
    return {"expired": len(report.expired_snapshot_ids), "deleted_files": report.deleted_files}


def run_series(
    pipe: Stack, label: str, commits: int, max_s: float, expire_every: int, retain: int
) -> dict[str, Any]:
    event_type = SERIES[label]
    table = str(pipe.writer.router.table_for(event_type))
    commit_ms: list[float] = []
    expiry_ms: list[float] = []
    expired = deleted = 0
    started = time.monotonic()
    for n in range(1, commits + 1):
        batch = f"{label}-{n:06d}"
        pipe.write(batch, make_events(batch, 1, types=(event_type,), day_offset=n % 7))
        began = time.perf_counter()
        results = pipe.commit(table)
        commit_ms.append((time.perf_counter() - began) * 1000)
        assert len(results) == 1 and results[0].files == 1, results
        if expire_every and label == "expiry_on" and n % expire_every == 0:
            began = time.perf_counter()
            did = expire(pipe, table, retain)
            expiry_ms.append((time.perf_counter() - began) * 1000)
            expired += did["expired"]
            deleted += did["deleted_files"]
        if time.monotonic() - started > max_s:
            break
    loaded = pipe.table(table)
    snapshot = loaded.current_snapshot()
    manifests = len(snapshot.manifests(loaded.io)) if snapshot is not None else 0
    return {
        "table": table,
        "commits": len(commit_ms),
        "seconds": time.monotonic() - started,
        "stopped_by": "commits" if len(commit_ms) == commits else "time budget",
        "commit_ms": commit_ms,
        "at": at_checkpoints(commit_ms),
        "trend": trend(commit_ms),
        "snapshots_at_end": len(loaded.metadata.snapshots),
        "manifests_in_current_snapshot": manifests,
        "expiry": {
            "every_commits": expire_every,
            "retain_last": retain,
            "runs": len(expiry_ms),
            "ms_median": median(expiry_ms),
            "ms_per_commit_amortised": sum(expiry_ms) / max(1, len(commit_ms)),
            "snapshots_expired": expired,
            "files_deleted": deleted,
        }
        if label == "expiry_on"
        else None,
    }


def at_checkpoints(commit_ms: list[float]) -> dict[str, float]:
    """Median latency of the commits around each checkpoint reached: within ``WINDOW`` commits
    or 10 % of the checkpoint, whichever is wider (a merge of manifests every hundred or so
    commits makes single commits spiky)."""
    out = {}
    for point in CHECKPOINTS:
        if len(commit_ms) >= point:
            half = max(WINDOW, point // 10)
            window = commit_ms[max(0, point - 1 - half) : point + half]
            out[str(point)] = median(window)
    return out


def trend(commit_ms: list[float]) -> dict[str, Any]:
    """Growth over the second half of the series, robust to outliers: the medians of its two
    quarters joined by a straight line (never sloping down: a commit does not get faster with
    age, a negative slope is noise); its value at the checkpoints not reached."""
    n = len(commit_ms)
    if n < 40:
        return {"slope_ms_per_1000_commits": None, "extrapolated": {}}
    q3 = list(range(n // 2, 3 * n // 4))
    q4 = list(range(3 * n // 4, n))
    x3, x4 = median([i + 1 for i in q3]), median([i + 1 for i in q4])
    y3, y4 = median([commit_ms[i] for i in q3]), median([commit_ms[i] for i in q4])
    slope = max(0.0, (y4 - y3) / (x4 - x3))
    return {
        "slope_ms_per_1000_commits": slope * 1000,
        "extrapolated": {str(p): y4 + slope * (p - x4) for p in CHECKPOINTS if p > n},
    }


def latency_at(series: dict[str, Any], point: int) -> tuple[float | None, bool]:
    """Measured latency at ``point`` (False) or extrapolated (True); None if neither."""
    if str(point) in series["at"]:
        return series["at"][str(point)], False
    value = series["trend"]["extrapolated"].get(str(point))
    return (value, True) if value is not None else (None, False)


def run(
    commits: int, max_s: float, expire_every: int, retain: int, max_s_off: float | None = None
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-aging-") as tmp,
        redis_server(Path(tmp) / "redis", appendonly=False) as url,
    ):
        pipe = make_stack(url, Path(tmp) / "home", lock_ttl_ms=30_000, retry_base_ms=50)
        try:
            series = {
                label: run_series(
                    pipe,
                    label,
                    commits,
                    max_s if label == "expiry_on" or max_s_off is None else max_s_off,
                    expire_every,
                    retain,
                )
                for label in SERIES
            }
        finally:
            pipe.close()
    on = series["expiry_on"]
    first, _ = latency_at(on, 10)
    last, extrapolated = latency_at(on, 10_000)
    ratio = last / first if first and last is not None else None
    return {
        "benchmark": NAME,
        "at": now_iso(),
        "series": series,
        "target": {
            "ratio_10000th_to_10th_at_most": TARGET_RATIO,
            "ratio": ratio,
            "ratio_is_extrapolated": extrapolated,
            "met": None if ratio is None else ratio <= TARGET_RATIO,
        },
        "environment": environment(),
    }


def _cell(series: dict[str, Any], point: int) -> str:
    value, extrapolated = latency_at(series, point)
    if value is None:
        return f"{'-':>9}"
    return f"{value:7.1f}{'*' if extrapolated else ' '} "


def report(result: dict[str, Any]) -> str:
    on, off = result["series"]["expiry_on"], result["series"]["expiry_off"]
    target = result["target"]
    lines = [
        "commit latency as a table ages (ms, median of the commits within max(10, n/10) of n; "
        "* = extrapolated from the second half of the series)",
        "  " + " " * 30 + "".join(f"{'#' + format(p, ','):>10}" for p in CHECKPOINTS),
    ]
    for label, series in (("expiry on (icefleet)", on), ("expiry off (baseline)", off)):
        lines.append(f"  {label:<30}" + "".join(f"{_cell(series, p):>10}" for p in CHECKPOINTS))
    for label, series in (("expiry on", on), ("expiry off", off)):
        slope = series["trend"]["slope_ms_per_1000_commits"]
        lines.append(
            row(
                f"  {label}: measured",
                f"{series['commits']:,} commits in {series['seconds']:.0f}s "
                f"(stopped by {series['stopped_by']}), {series['snapshots_at_end']} snapshots, "
                f"{series['manifests_in_current_snapshot']} manifests at the end"
                + (f"; trend {slope:+.1f} ms per 1,000 commits" if slope is not None else ""),
            )
        )
    expiry = on["expiry"]
    lines.append(
        row(
            "  expiry runs (maintenance, not in the commits)",
            f"{expiry['runs']} x {expiry['ms_median']:.0f} ms median, "
            f"{expiry['ms_per_commit_amortised']:.1f} ms per commit amortised; "
            f"{expiry['snapshots_expired']} snapshots expired, "
            f"{expiry['files_deleted']} files deleted",
        )
    )
    ratio = target["ratio"]
    if ratio is not None:
        lines.append(
            row(
                "  10,000th / 10th commit, expiry on",
                f"{ratio:9.2f}x{' (extrapolated)' if target['ratio_is_extrapolated'] else ''} "
                f"(target <= {TARGET_RATIO:.0f}x: {verdict(target['met'])})",
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run(
        args.commits, args.max_seconds, args.expire_every, args.retain, args.max_seconds_off
    )
    print(report(result))
    print(f"  results: {write_results(NAME, result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
