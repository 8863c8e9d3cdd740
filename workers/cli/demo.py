"""``icefleet demo``: synthetic shop events through a local fleet, with the figures to show for it.

Three event types with nested data (page views, orders with line items, sign-ups with UTM
parameters), spread over two days so the tables get two ``day(time)`` partitions. The content is
a function of the seed; event ids also carry a run id, so repeated demos add rows instead of
colliding with the ids of an earlier run.
"""

from __future__ import annotations

import os
import random
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pyiceberg.catalog import Catalog

from common.coord.backlog import Waiter
from common.ingest.producer import Producer
from common.ingest.routing import Router
from common.lake.query import sql_name
from common.settings import Settings
from workers.cli.status import TableStats, table_stats

BASE_TIME = datetime(2025, 6, 1, tzinfo=UTC)
SPAN_S = 2 * 86_400
SOURCE = "https://shop.example.com"
TYPES = (
    ("com.example.shop.page_view", 0.70),
    ("com.example.shop.order_placed", 0.20),
    ("com.example.shop.user_signed_up", 0.10),
)
_PATHS = ("/", "/products", "/products/{sku}", "/cart", "/checkout", "/blog/{slug}", "/search")
_REFERRERS = (None, "https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x")
_AGENTS = ("Mozilla/5.0 (X11; Linux x86_64)", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4)")
_COUNTRIES = ("DE", "FR", "US", "GB", "NL", "ES", "IT", "PL", "SE", "JP")
_PLANS = ("free", "free", "free", "pro", "team")
_UTM = (("google", "cpc", "spring_sale"), ("newsletter", "email", "june"), (None, None, None))
#: How often the demo asks Redis whether everything it sent is committed (one small read), and
#: how often it counts the committed rows for its progress bar (three tables from the catalog).
POLL_S = 0.1
PROGRESS_S = 0.5


def _page_view(rng: random.Random, n: int) -> dict[str, Any]:
    sku = f"SKU-{rng.randrange(1, 5000):05d}"
    path = rng.choice(_PATHS).format(sku=sku, slug=f"post-{rng.randrange(1, 300)}")
    return {
        "url": f"{SOURCE}{path}",
        "referrer": rng.choice(_REFERRERS),
        "session_id": f"s-{rng.getrandbits(48):012x}",
        "user_id": f"u-{rng.randrange(1, 20_000)}" if rng.random() < 0.4 else None,
        "user_agent": rng.choice(_AGENTS),
        "viewport": {
            "width": rng.choice((375, 768, 1280, 1920)),
            "height": rng.randrange(600, 1200),
        },
        "duration_ms": rng.randrange(200, 120_000),
    }


def _order(rng: random.Random, n: int) -> dict[str, Any]:
    lines = [
        (f"SKU-{rng.randrange(1, 5000):05d}", rng.randrange(1, 4), round(rng.uniform(2, 250), 2))
        for _ in range(rng.randrange(1, 5))
    ]
    items = [{"sku": sku, "quantity": qty, "unit_price": price} for sku, qty, price in lines]
    total = round(sum(qty * price for _, qty, price in lines), 2)
    return {
        "order_id": f"o-{n}",
        "customer": {
            "id": f"u-{rng.randrange(1, 20_000)}",
            "country": rng.choice(_COUNTRIES),
            "returning": rng.random() < 0.6,
        },
        "items": items,
        "item_count": len(items),
        "total": total,
        "currency": rng.choice(("EUR", "USD", "GBP")),
        "coupon": rng.choice((None, None, None, "SPRING10", "WELCOME5")),
    }


def _signup(rng: random.Random, n: int) -> dict[str, Any]:
    source, medium, campaign = rng.choice(_UTM)
    return {
        "user_id": f"u-new-{n}",
        "email": f"user{n}@example.com",
        "plan": rng.choice(_PLANS),
        "utm": {"source": source, "medium": medium, "campaign": campaign},
        "marketing_opt_in": rng.random() < 0.3,
        "age_days_of_trial": rng.randrange(0, 30),
    }


_DATA: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    TYPES[0][0]: _page_view,
    TYPES[1][0]: _order,
    TYPES[2][0]: _signup,
}


def synthetic_events(count: int, seed: int = 7, run_id: str = "demo") -> Iterator[dict[str, Any]]:
    """``count`` CloudEvents of the three shop types, deterministic for a seed and run id."""
    rng = random.Random(seed)
    types = [t for t, _ in TYPES]
    weights = [w for _, w in TYPES]
    for n in range(count):
        event_type = rng.choices(types, weights)[0]
        when = BASE_TIME + timedelta(milliseconds=rng.randrange(SPAN_S * 1000))
        yield {
            "specversion": "1.0",
            "id": f"{run_id}-{n}",
            "source": f"{SOURCE}/{event_type.rsplit('.', 1)[-1]}",
            "type": event_type,
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": _DATA[event_type](rng, n),
        }


def demo_tables(settings: Settings) -> list[str]:
    router = Router(settings.routes, settings.namespace)
    return [str(router.table_for(event_type)) for event_type, _ in TYPES]


def next_commands(settings: Settings) -> list[str]:
    """What to run after the demo to look at its data (printed at its end)."""
    orders = sql_name(demo_tables(settings)[1].split("."))
    sql = (
        "SELECT customer.country AS country, count(*) AS orders, round(sum(total), 2) AS revenue "
        f"FROM {orders} GROUP BY 1 ORDER BY orders DESC"
    )
    return ["icefleet tables", f"icefleet query {shlex.quote(sql)}"]


def seconds_since_process_start() -> float | None:
    """How long this process has existed (Linux; None elsewhere): the interpreter's start and
    the CLI's imports, before any of the demo's own phases."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Phases:
    """When each phase of a demo ended (``icefleet demo --timings``)."""

    started: float = field(default_factory=time.monotonic)
    before_s: float | None = field(default_factory=seconds_since_process_start)
    ends: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, phase: str) -> None:
        """``phase`` ended now (it began where the one before ended)."""
        self.ends.append((phase, time.monotonic()))

    def durations(self) -> list[tuple[str, float]]:
        """(phase, seconds), the process's start and imports first when known."""
        rows = [] if self.before_s is None else [("python + imports", self.before_s)]
        last = self.started
        for phase, end in self.ends:
            rows.append((phase, end - last))
            last = end
        return rows

    def describe(self) -> str:
        rows = self.durations()
        total = sum(seconds for _, seconds in rows)
        parts = ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in rows)
        return f"timings: {parts}; total {total:.2f}s"


@dataclass
class ReadBack:
    """The demo's events as read back from its tables: each must be there exactly once."""

    rows: int = 0
    missing: int = 0
    duplicated: int = 0
    unexpected: int = 0

    @property
    def exact(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)

    def describe(self) -> str:
        if self.exact:
            return f"read back {self.rows:,} rows: every event exactly once"
        return (
            f"read back {self.rows:,} rows: {self.missing:,} event(s) missing, "
            f"{self.duplicated:,} duplicated, {self.unexpected:,} not sent by this run"
        )


@dataclass
class DemoReport:
    """What a demo run did, table by table."""

    events: int
    seconds: float
    sent: dict[str, int]
    before: dict[str, TableStats]
    after: dict[str, TableStats]
    dead_letters: int = 0
    batches: list[str] = field(default_factory=list)
    run_id: str = ""
    #: the event ids sent to each table
    ids: dict[str, set[str]] = field(default_factory=dict)
    read_back: ReadBack | None = None

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def added(self, table: str, attribute: str) -> int:
        before = self.before.get(table)
        after = self.after.get(table)
        if after is None:
            return 0
        return int(getattr(after, attribute)) - (int(getattr(before, attribute)) if before else 0)

    @property
    def rows_added(self) -> int:
        return sum(self.added(t, "rows") for t in self.sent)


def committed_rows(catalog: Catalog, tables: list[str], before: dict[str, TableStats]) -> int:
    """Rows committed to the demo tables since ``before`` (0 on a transient catalog error)."""
    try:
        now = table_stats(catalog, tables)
    except Exception:  # a catalog read racing a commit; the next poll sees it
        return -1
    return sum(now[t].rows - (before[t].rows if t in before else 0) for t in now)


def run_demo(
    settings: Settings,
    catalog: Catalog,
    producer: Producer,
    *,
    events: int,
    batch_size: int,
    seed: int,
    timeout_s: float,
    on_progress: Callable[[int, int], None],
    phases: Phases | None = None,
) -> DemoReport:
    """Send the events in batches and wait until every row is committed.

    ``on_progress(enqueued, committed_rows)`` is called as both move. The report holds the
    ids sent to each table, for :func:`read_back`.
    """
    from common.coord.deadletters import DeadLetterStore

    tables = demo_tables(settings)
    router = Router(settings.routes, settings.namespace)
    before = table_stats(catalog, tables)
    dead_before = DeadLetterStore(producer.client).count()
    run_id = uuid.uuid4().hex[:8]
    sent: dict[str, int] = dict.fromkeys(tables, 0)
    sent_ids: dict[str, set[str]] = {table: set() for table in tables}
    started = time.monotonic()
    last_poll = 0.0
    committed = 0
    enqueued = 0
    batch: list[dict[str, Any]] = []
    ids: list[str] = []

    def flush() -> None:
        nonlocal enqueued
        ids.extend(producer.enqueue_many(batch))
        enqueued += len(batch)
        batch.clear()

    for event in synthetic_events(events, seed, run_id):
        table = str(router.table_for(event["type"]))
        sent[table] += 1
        sent_ids[table].add(event["id"])
        batch.append(event)
        if len(batch) >= batch_size:
            flush()
            if time.monotonic() - last_poll > PROGRESS_S:
                last_poll = time.monotonic()
                committed = max(committed, committed_rows(catalog, tables, before))
                on_progress(enqueued, committed)
    if batch:
        flush()
    if phases is not None:
        phases.mark("send")
    deadline = started + timeout_s
    waiter = Waiter(producer.client)
    while True:
        on_progress(enqueued, committed)
        result = waiter.poll()
        if result.done:
            break
        if time.monotonic() - last_poll > PROGRESS_S:  # the catalog: costlier than Redis
            last_poll = time.monotonic()
            committed = max(committed, committed_rows(catalog, tables, before))
        if time.monotonic() > deadline:
            raise TimeoutError(f"not committed after {timeout_s:.0f}s: " + result.describe())
        time.sleep(POLL_S)
    seconds = time.monotonic() - started
    if phases is not None:
        phases.mark("write + commit")
    after = table_stats(catalog, tables)
    report = DemoReport(
        events, seconds, sent, before, after, batches=ids, run_id=run_id, ids=sent_ids
    )
    report.dead_letters = DeadLetterStore(producer.client).count() - dead_before
    on_progress(enqueued, report.rows_added)
    return report


def read_back(catalog: Catalog, report: DemoReport) -> ReadBack:
    """Read this run's event ids back from each table and count what is missing, duplicated
    or not sent by this run (ids carry the run id, so earlier demos' rows are left out, most of
    their files unread: the filter prunes by the id column's bounds)."""
    result = ReadBack()
    for name, sent in report.ids.items():
        table = catalog.load_table(tuple(name.split(".")))
        # LIKE 'prefix%' is pyiceberg's StartsWith; a run id is hex, nothing to escape
        scan = table.scan(row_filter=f"id LIKE '{report.run_id}-%'", selected_fields=("id",))
        found = scan.to_arrow().column("id").to_pylist()
        distinct = set(found)
        result.rows += len(found)
        result.duplicated += len(found) - len(distinct)
        result.missing += len(sent - distinct)
        result.unexpected += len(distinct - sent)
    return result
