"""Prometheus metrics: a :class:`Metrics` object per process, each with its own registry.

Nothing is registered at import: :func:`create_metrics` builds the metrics in a fresh
``CollectorRegistry``, so tests, the gateway and each worker process hold their own and nothing
global needs resetting.

Two kinds of figures:

- **Events in one process**, recorded where they happen: the gateway counts accepted and rejected
  events and bytes; a worker process (``workers/observability.py``, from Celery signals) counts
  batches written, events dead-lettered, rows committed per table, and times batch writes,
  commits and canary probes. Each process exposes its own; Prometheus sums them.
- **Shared state, read from Redis at scrape time** by :class:`RedisStateCollector`: the backlog
  (outstanding and pending batches, queue lengths), dead letters, the freshness lag of each table
  (now minus its last commit, from the committer's dedup memory ``icefleet:committed:<table>``,
  whose scores are commit times), duplicate events per table (common/coord/claims.py), the
  canary's last result and the sampled validation's
  (``icefleet_verify_failures_total``, the last run's time). Any process that reaches Redis
  reports these for the whole fleet, never stale; the gateway does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from common.coord import keys
from common.coord.backlog import read_backlog
from common.coord.budget import Budget, read_use
from common.coord.pending import PendingRegistry
from common.coord.replies import as_text

__all__ = [
    "CANARY_LAST_KEY",
    "CONTENT_TYPE_LATEST",
    "Metrics",
    "RedisStateCollector",
    "create_metrics",
]

logger = logging.getLogger(__name__)

CANARY_LAST_KEY = keys.canary_last()  # kept for importers; the name lives in common/coord/keys.py
# Batch writes and commits take from milliseconds (a few events) to minutes (a large group commit
# on a REST catalog); the canary's end-to-end time is at least a commit interval.
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CANARY_BUCKETS_S = (0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass
class Metrics:
    """Every metric icefleet records in a process, registered in :attr:`registry`."""

    registry: CollectorRegistry
    events_accepted: Counter
    events_rejected: Counter
    events_written: Counter
    events_dead_lettered: Counter
    accepted_bytes: Counter
    batch_bytes: Counter
    batches: Counter
    batch_write_seconds: Histogram
    commit_seconds: Histogram
    canary_seconds: Histogram
    http_requests: Counter
    http_request_seconds: Histogram
    http_refused: Counter

    def render(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


def create_metrics(
    client: redis.Redis | None = None,
    *,
    clock: Callable[[], float] = time.time,
    budget: Budget | None = None,
) -> Metrics:
    """A fresh registry with every metric; with a Redis ``client``, also the shared state (and
    the ``budget``'s limits beside its use)."""
    registry = CollectorRegistry(auto_describe=True)

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=registry)

    def histogram(
        name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = ()
    ) -> Histogram:
        return Histogram(
            name, doc, labels, registry=registry, buckets=buckets or DURATION_BUCKETS_S
        )

    metrics = Metrics(
        registry=registry,
        events_accepted=counter(
            "icefleet_events_accepted",
            "Events accepted by the HTTP gateway and enqueued, by destination table.",
            ("table",),
        ),
        events_rejected=counter(
            "icefleet_events_rejected",
            "Events the HTTP gateway refused as invalid (answered 400, not enqueued).",
        ),
        events_written=counter(
            "icefleet_events_written",
            "Events written to a table: rows in the snapshots the committer made, by table.",
            ("table",),
        ),
        events_dead_lettered=counter(
            "icefleet_events_dead_lettered",
            "Events a writer put in the dead-letter store, by the batch's table "
            "('unrouted' when the batch was routed by event type).",
            ("table",),
        ),
        accepted_bytes=counter(
            "icefleet_accepted_bytes",
            "Bytes of the events the HTTP gateway accepted (their JSON as enqueued).",
        ),
        batch_bytes=counter(
            "icefleet_batch_bytes", "Bytes of the batch payloads writers processed."
        ),
        batches=counter(
            "icefleet_batches",
            "Write tasks finished, by outcome (written, dead_lettered, retried, failed).",
            ("outcome",),
        ),
        batch_write_seconds=histogram(
            "icefleet_batch_write_seconds",
            "Time a writer took for one batch: validate, Parquet, register pending.",
        ),
        commit_seconds=histogram(
            "icefleet_commit_seconds",
            "Time of one group commit (one snapshot), by table.",
            ("table",),
        ),
        canary_seconds=histogram(
            "icefleet_canary_seconds",
            "End-to-end time of canary probes: enqueue until visible in a table scan.",
            buckets=CANARY_BUCKETS_S,
        ),
        http_requests=counter(
            "icefleet_http_requests",
            "HTTP requests answered, by route and status.",
            ("route", "status"),
        ),
        http_request_seconds=histogram(
            "icefleet_http_request_seconds", "Time to answer an HTTP request, by route.", ("route",)
        ),
        http_refused=counter(
            "icefleet_http_refused",
            "Requests the gateway refused for want of room, by reason (overloaded: 429, the "
            "budget is used up; redis_unreachable, redis_loading, redis_full: 503).",
            ("reason",),
        ),
    )
    if client is not None:
        registry.register(RedisStateCollector(client, clock=clock, budget=budget))
    return metrics


class RedisStateCollector(Collector):
    """Gauges read from Redis at each scrape: backlog, dead letters, freshness, canary.

    An unreachable Redis yields ``icefleet_redis_up 0`` and nothing else, never a failed scrape.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        clock: Callable[[], float] = time.time,
        budget: Budget | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._budget = budget

    def describe(self) -> list[Metric]:
        return []  # values only exist at collect time; nothing to check for name clashes

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("icefleet_redis_up", "Whether Redis answered this scrape (1/0).")
        try:
            families = list(self._families())
        except redis.RedisError as exc:
            logger.warning("metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        now_s = self._clock()
        backlog = read_backlog(self._client)
        outstanding = GaugeMetricFamily(
            "icefleet_outstanding_batches", "Batches enqueued and not written yet."
        )
        outstanding.add_metric([], backlog.outstanding)
        yield outstanding
        oldest = GaugeMetricFamily(
            "icefleet_oldest_outstanding_age_seconds",
            "Age of the oldest batch enqueued and not written yet (0 when none).",
        )
        first = backlog.oldest_outstanding_ms
        oldest.add_metric([], max(0.0, now_s - first / 1000) if first else 0.0)
        yield oldest
        pending = GaugeMetricFamily(
            "icefleet_pending_batches",
            "Batches written and waiting for their commit, by table.",
            labels=["table"],
        )
        for table, count in sorted(backlog.pending.items()):
            pending.add_metric([table], count)
        yield pending
        queued = GaugeMetricFamily(
            "icefleet_queue_messages", "Messages waiting in a Celery queue.", labels=["queue"]
        )
        for queue, count in sorted(backlog.queued.items()):
            queued.add_metric([queue], count)
        yield queued
        dead = GaugeMetricFamily(
            "icefleet_dead_letters", "Entries in the dead-letter store (see `icefleet status`)."
        )
        dead.add_metric([], int(self._client.xlen(keys.dead_letters())))
        yield dead
        yield from self._budget_use()
        yield from self._freshness(now_s)
        yield from self._duplicates()
        yield from self._canary()
        yield from self._validation()

    def _budget_use(self) -> Iterator[Metric]:
        use = read_use(self._client)
        figures = {
            "bytes": ("bytes of packed payload", use.bytes),
            "batches": ("batches", use.batches),
        }
        for unit, (what, value) in figures.items():
            family = GaugeMetricFamily(
                f"icefleet_budget_{unit}_in_use",
                f"Work not yet written, in {what}: the fleet's budget in use (past the limit "
                "producers are refused; the gateway answers 429).",
            )
            family.add_metric([], value)
            yield family
        if self._budget is not None:
            for unit, limit in (
                ("bytes", self._budget.max_bytes),
                ("batches", self._budget.max_batches),
            ):
                family = GaugeMetricFamily(
                    f"icefleet_budget_{unit}_limit",
                    f"The budget of work not yet written, in {unit} (ICEFLEET_BUDGET_MAX_*).",
                )
                family.add_metric([], limit)
                yield family

    def _freshness(self, now_s: float) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "icefleet_freshness_lag_seconds",
            "Seconds since the last commit of each table (grows while a table gets no events: "
            "alert on it together with icefleet_pending_batches).",
            labels=["table"],
        )
        last = GaugeMetricFamily(
            "icefleet_last_commit_timestamp_seconds",
            "Unix time of the last commit of each table.",
            labels=["table"],
        )
        pattern = keys.committed("*")
        names = sorted(
            as_text(key)[len(pattern) - 1 :] for key in self._client.scan_iter(match=pattern)
        )
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.zrange(keys.committed(name), -1, -1, withscores=True)
        for name, newest in zip(names, pipe.execute(), strict=True):
            if not newest:
                continue
            committed_s = float(newest[0][1]) / 1000
            last.add_metric([name], committed_s)
            lag.add_metric([name], max(0.0, now_s - committed_s))
        yield lag
        yield last

    def _duplicates(self) -> Iterator[Metric]:
        dropped = CounterMetricFamily(
            "icefleet_duplicates_dropped",
            "Events not written because an event with the same (source, id) and the same bytes "
            "landed or is pending in the table within the dedup window, by table.",
            labels=["table"],
        )
        conflicting = CounterMetricFamily(
            "icefleet_duplicates_conflicting",
            "Events dead-lettered because an event with the same (source, id) but other bytes "
            "landed or is pending in the table (a producer bug), by table.",
            labels=["table"],
        )
        for table, (drops, conflicts) in sorted(PendingRegistry(self._client).duplicates().items()):
            dropped.add_metric([table], drops)
            conflicting.add_metric([table], conflicts)
        yield dropped
        yield conflicting

    def _canary(self) -> Iterator[Metric]:
        raw = self._client.get(keys.canary_last())
        if raw is None:
            return
        try:
            probe: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        ok = GaugeMetricFamily(
            "icefleet_canary_ok", "Whether the last canary probe became visible in time (1/0)."
        )
        ok.add_metric([], 1 if probe.get("status") == "ok" else 0)
        yield ok
        if probe.get("latency_s") is not None:
            seconds = GaugeMetricFamily(
                "icefleet_canary_last_seconds",
                "End-to-end time of the last canary probe that became visible.",
            )
            seconds.add_metric([], float(probe["latency_s"]))
            yield seconds
        if probe.get("checked_ms") is not None:
            at = GaugeMetricFamily(
                "icefleet_canary_last_timestamp_seconds", "Unix time of the last canary result."
            )
            at.add_metric([], float(probe["checked_ms"]) / 1000)
            yield at

    def _validation(self) -> Iterator[Metric]:
        """The sampled validation's figures (common/maintenance/sampling.py)."""
        raw, total = self._client.mget(keys.verify_last(), keys.verify_failures())
        failures = CounterMetricFamily(
            "icefleet_verify_failures",
            "Bad data files found by the sampled validation (a page checksum, the row count or "
            "the column statistics disagreeing), since the counter began in Redis.",
        )
        failures.add_metric([], float(total or 0))
        yield failures
        if raw is None:
            return
        try:
            run: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        at = GaugeMetricFamily(
            "icefleet_verify_last_run_timestamp_seconds",
            "Unix time of the last sampled validation run.",
        )
        at.add_metric([], float(run.get("checked_ms", 0)) / 1000)
        yield at
        files = GaugeMetricFamily(
            "icefleet_verify_last_run_files", "Files the last sampled validation run checked."
        )
        files.add_metric([], float(run.get("files", 0)))
        yield files
        bad = GaugeMetricFamily(
            "icefleet_verify_last_run_failures", "Bad files the last sampled validation run found."
        )
        bad.add_metric([], float(run.get("failures", 0)))
        yield bad
