"""Freshness: from enqueue to visible in a table scan, idle and at half of peak load.

A real local fleet (``workers.fleet.Fleet``: its own ``redis-server``, ``--writers`` writer
processes, the committer with its beat, SQLite catalog, local warehouse; default settings, so
``ICEFLEET_COMMIT_INTERVAL_MS`` = 1 s) under a fresh temporary home:

1. **peak**: a burst of ``--peak-events`` demo events in batches of ``--batch``, as fast as the
   producer sends them; peak = events / time until every batch is committed (end to end, so
   sustainable: the committer keeps up with it; the last commit interval is in it).
2. **probes**: every ``--probe-every`` seconds a probe thread's producer enqueues a batch of ONE
   event with a unique id into ``events.probe``; the main thread polls the catalog every
   ``--poll-ms`` and, when the probe table has a new snapshot, scans it (pyiceberg
   ``table.scan(row_filter=In("id", waiting))``) and records, for each probe found, the time
   from its enqueue to the scan that returned it (the scan's own time included). A probe not
   seen 30 s after the phase counts with its age then (a lower bound), not as missing.
3. Probes run first with the fleet **idle** (the baseline, same run, same fleet) for
   ``--seconds`` / 2, then with a load thread enqueueing demo events at **half of the peak**
   rate in batches of ``--batch`` for ``--seconds``.

p50 / p95 / max per phase. Target (issue 8): p95 under 2 s at half of peak load. Run:
``python -m benchmarks freshness`` or ``python -m benchmarks.bench_freshness --seconds 60``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import In

from benchmarks._shared import (
    environment,
    fmt_rate,
    median,
    now_iso,
    percentile,
    row,
    verdict,
    write_results,
)
from common.coord.backlog import Waiter
from common.ingest.producer import Producer
from common.lake.catalog import open_catalog
from common.settings import Settings, load_settings
from tests.support.events import ndjson
from workers.cli.demo import synthetic_events
from workers.fleet import Fleet

NAME = "freshness"
TARGET_P95_S = 2.0
PROBE_TYPE = "com.example.bench.probe"
PROBE_TABLE = ("events", "probe")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_freshness", description=__doc__)
    parser.add_argument("--writers", type=int, default=2, help="writer processes")
    parser.add_argument("--peak-events", type=int, default=100_000, help="events in the burst")
    parser.add_argument("--batch", type=int, default=2_000, help="events per batch (burst, load)")
    parser.add_argument("--seconds", type=float, default=60.0, help="probing under load")
    parser.add_argument("--probe-every", type=float, default=0.5, help="seconds between probes")
    parser.add_argument("--poll-ms", type=float, default=50.0, help="catalog poll interval")
    parser.add_argument(
        "--rate", type=float, default=None, help="load events/s (default: half of the peak)"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def probe_event(n: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"probe-{n:06d}",
        "source": "/bench/freshness",
        "type": PROBE_TYPE,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": {"n": n},
    }


def payloads(events: int, batch: int, run_id: str) -> list[str]:
    """Demo events as NDJSON payloads of ``batch`` events, encoded before any clock starts (the
    producer then only cuts lines and sends: little CPU taken from the fleet on 2 cores)."""
    load = list(synthetic_events(events, seed=3, run_id=run_id))
    return [ndjson(load[i : i + batch]) for i in range(0, len(load), batch)]


def measure_peak(settings: Settings, events: int, batch: int) -> dict[str, Any]:
    burst = payloads(events, batch, "peak")
    with Producer(settings) as producer:
        started = time.monotonic()
        for payload in burst:
            producer.enqueue_many(payload)
        waiter = Waiter(producer.client)
        written_s = None
        while not (state := waiter.poll()).done:
            if written_s is None and not state.not_written:
                written_s = time.monotonic() - started
            time.sleep(0.05)
        committed_s = time.monotonic() - started
    written_s = written_s or committed_s
    return {
        "events": events,
        "written_s": written_s,
        "committed_s": committed_s,
        "written_events_per_s": events / written_s,
        "committed_events_per_s": events / committed_s,
    }


class LoadThread(threading.Thread):
    """Enqueues demo events at ``rate`` events/s in batches of ``batch`` until stopped."""

    def __init__(self, settings: Settings, rate: float, batch: int) -> None:
        super().__init__(daemon=True)
        self.settings, self.rate, self.batch = settings, rate, batch
        self.stop_event = threading.Event()
        self.sent = 0
        self.seconds = 0.0

    def run(self) -> None:
        ready = payloads(20 * self.batch, self.batch, "load")  # cycled: ids repeat, harmless
        with Producer(self.settings) as producer:
            started = time.monotonic()
            while not self.stop_event.is_set():
                producer.enqueue_many(ready[(self.sent // self.batch) % len(ready)])
                self.sent += self.batch
                due = started + self.sent / self.rate
                self.stop_event.wait(max(0.0, due - time.monotonic()))
            self.seconds = time.monotonic() - started


class Prober:
    """Sends probes from a thread; finds them with scans from the caller's thread."""

    def __init__(self, settings: Settings, catalog: Catalog, every_s: float) -> None:
        self.settings, self.catalog, self.every_s = settings, catalog, every_s
        self.sent: dict[str, float] = {}  # probe id -> enqueue time (monotonic)
        self.seen: dict[str, float] = {}  # probe id -> latency, s
        self.lock = threading.Lock()
        self.count = 0
        self.snapshot_id: int | None = None
        self.scans_ms: list[float] = []
        self.unseen: list[int] = []  # per phase: probes not seen 30 s after it

    def send_for(self, seconds: float, poll_s: float) -> list[float]:
        """Probe for ``seconds``, then wait (at most 30 s) for the stragglers; the latencies."""
        stop = threading.Event()
        first = len(self.seen)

        def sender() -> None:
            with Producer(self.settings) as producer:
                while not stop.is_set():
                    self.count += 1
                    event = probe_event(self.count)
                    with self.lock:
                        self.sent[event["id"]] = time.monotonic()
                    producer.enqueue([event])
                    stop.wait(self.every_s)

        thread = threading.Thread(target=sender, daemon=True)
        started = time.monotonic()
        thread.start()
        while time.monotonic() - started < seconds:
            self.poll()
            time.sleep(poll_s)
        stop.set()
        thread.join()
        deadline = time.monotonic() + 30
        while self.waiting() and time.monotonic() < deadline:
            self.poll()
            time.sleep(poll_s)
        now = time.monotonic()
        with self.lock:
            unseen = [now - self.sent[i] for i in self.sent if i not in self.seen]
        self.sent = {i: t for i, t in self.sent.items() if i in self.seen}  # give up on them
        self.unseen.append(len(unseen))
        return list(self.seen.values())[first:] + unseen

    def waiting(self) -> list[str]:
        with self.lock:
            return [i for i in self.sent if i not in self.seen]

    def poll(self) -> None:
        try:
            table = self.catalog.load_table(PROBE_TABLE)
        except NoSuchTableError:
            return
        snapshot = table.current_snapshot()
        if snapshot is None or snapshot.snapshot_id == self.snapshot_id:
            return
        self.snapshot_id = snapshot.snapshot_id
        waiting = self.waiting()
        if not waiting:
            return
        began = time.monotonic()
        where = In("id", waiting)  # type: ignore[call-arg,arg-type]  # pydantic-made signature
        found = table.scan(row_filter=where, selected_fields=("id",)).to_arrow()
        now = time.monotonic()
        self.scans_ms.append((now - began) * 1000)
        for probe_id in found.column("id").to_pylist():
            if probe_id not in self.seen:
                self.seen[probe_id] = now - self.sent[probe_id]


def stats(latencies: list[float]) -> dict[str, Any]:
    return {
        "latencies_s": sorted(latencies),
        "probes": len(latencies),
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "max_s": max(latencies) if latencies else float("nan"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="icefleet-bench-fresh-") as tmp:
        settings = load_settings(None, home=Path(tmp) / "home")
        fleet = Fleet(settings, writers=args.writers, spawn_redis=True, loglevel="WARNING")
        try:
            fleet.start()
            fleet.wait_ready(timeout_s=120)
            settings = fleet.settings
            catalog = open_catalog(settings)
            peak = measure_peak(settings, args.peak_events, args.batch)
            prober = Prober(settings, catalog, args.probe_every)
            poll_s = args.poll_ms / 1000
            prober.send_for(1.0, poll_s)  # warm-up: creates the probe table
            idle = prober.send_for(args.seconds / 2, poll_s)
            rate = args.rate or peak["committed_events_per_s"] / 2
            load = LoadThread(settings, rate, args.batch)
            load.start()
            time.sleep(3.0)  # let the load settle before probing
            loaded = prober.send_for(args.seconds, poll_s)
            load.stop_event.set()
            load.join()
            unseen = {"idle": prober.unseen[1], "half_peak": prober.unseen[2]}
            with Producer(settings) as producer:
                backlog_at_end = Waiter(producer.client).poll().describe()
        finally:
            fleet.stop()
    under_load = stats(loaded)
    return {
        "benchmark": NAME,
        "at": now_iso(),
        "writers": args.writers,
        "commit_interval_ms": settings.commit_interval_ms,
        "peak": peak,
        "load": {
            "target_events_per_s": rate,
            "achieved_events_per_s": load.sent / load.seconds if load.seconds else 0.0,
            "batch": args.batch,
        },
        "idle": stats(idle),
        "half_peak": under_load,
        "probes_unseen_after_30s": unseen,
        "backlog_at_end": backlog_at_end,
        "scan_ms_median": median(prober.scans_ms),
        "poll_ms": args.poll_ms,
        "target_p95_s": TARGET_P95_S,
        "target_met": under_load["p95_s"] < TARGET_P95_S,
        "environment": environment(),
    }


def report(result: dict[str, Any]) -> str:
    peak, load = result["peak"], result["load"]

    def line(label: str, s: dict[str, Any]) -> str:
        return row(
            f"  {label}",
            f"p50 {s['p50_s']:5.2f} s  p95 {s['p95_s']:5.2f} s  max {s['max_s']:5.2f} s "
            f"({s['probes']} probes)",
        )

    return "\n".join(
        [
            f"freshness, enqueue -> visible in a scan: {result['writers']} writers, commit "
            f"interval {result['commit_interval_ms']} ms, poll {result['poll_ms']:.0f} ms "
            f"(scan {result['scan_ms_median']:.0f} ms median)",
            row(
                "  peak (burst, enqueue -> committed)",
                f"{fmt_rate(peak['committed_events_per_s'])}  "
                f"({fmt_rate(peak['written_events_per_s']).strip()} until all written)",
            ),
            line("idle fleet (baseline)", result["idle"]),
            line(
                f"at half of peak ({load['achieved_events_per_s']:,.0f} ev/s)",
                result["half_peak"],
            ),
            row(
                "  p95 at half of peak",
                f"{result['half_peak']['p95_s']:9.2f} s (target < {result['target_p95_s']:.0f} s:"
                f" {verdict(result['target_met'])}; {result['probes_unseen_after_30s']['half_peak']} probes unseen after 30 s)",
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run(args)
    print(report(result))
    print(f"  results: {write_results(NAME, result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
