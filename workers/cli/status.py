"""``icefleet status``: queues, the backlog, dead letters, the canary and the sampled validation,
and per table its snapshots, files, rows and the last commit with its lag. Also the per-table
figures the demo prints."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table as RichTable
from rich.text import Text

from common.commit.committer import committed_seq
from common.coord import keys
from common.coord.backlog import Backlog, read_backlog
from common.coord.deadletters import DeadLetterStore
from common.coord.pending import PendingRegistry
from common.lake.catalog import catalog_tables
from common.redaction import redact_url
from common.settings import Settings


@dataclass(frozen=True)
class TableStats:
    """One table as its current metadata describes it."""

    table: str
    snapshots: int
    files: int
    rows: int
    commit_seq: int
    last_commit_ms: int | None

    @classmethod
    def of(cls, name: str, table: Table) -> TableStats:
        snapshot = table.current_snapshot()
        summary = snapshot.summary if snapshot is not None else None
        extra = summary.additional_properties if summary is not None else {}
        return cls(
            table=name,
            snapshots=len(table.metadata.snapshots),
            files=int(extra.get("total-data-files", 0)),
            rows=int(extra.get("total-records", 0)),
            commit_seq=committed_seq(table),
            last_commit_ms=snapshot.timestamp_ms if snapshot is not None else None,
        )


def table_stats(catalog: Catalog, names: list[str] | None = None) -> dict[str, TableStats]:
    names = catalog_tables(catalog) if names is None else names
    out = {}
    for name in names:
        parts = tuple(name.split("."))
        if catalog.table_exists(parts):
            out[name] = TableStats.of(name, catalog.load_table(parts))
    return out


def oldest_pending_ms(client: redis.Redis, tables: list[str]) -> dict[str, int | None]:
    from common.coord.pending import PendingRegistry

    registry = PendingRegistry(client)
    return {t: registry.stats(t).oldest_registered_ms for t in tables}


def collect(
    settings: Settings, client: redis.Redis, catalog: Catalog | None, workers: list[str] | None
) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (what ``--json`` prints)."""
    now_ms = int(time.time() * 1000)
    backlog: Backlog = read_backlog(client)
    tables = table_stats(catalog) if catalog is not None else {}
    names = sorted(set(tables) | set(backlog.pending))
    oldest = oldest_pending_ms(client, names)
    duplicates = PendingRegistry(client).duplicates()
    names = sorted(set(names) | set(duplicates))
    per_table = []
    for name in names:
        stats = tables.get(name)
        pending_since = oldest.get(name)
        row: dict[str, Any] = asdict(stats) if stats else {"table": name}
        row["pending_batches"] = backlog.pending.get(name, 0)
        # repeats of events that landed: dropped (same bytes), dead-lettered (other bytes)
        row["duplicates_dropped"], row["duplicates_conflicting"] = duplicates.get(name, (0, 0))
        # lag: how long the oldest batch written to this table has waited for its commit
        row["lag_ms"] = max(0, now_ms - pending_since) if pending_since else 0
        last = stats.last_commit_ms if stats else None
        row["last_commit_age_ms"] = now_ms - last if last else None
        per_table.append(row)
    return {
        "redis_url": redact_url(settings.redis_url),
        "catalog": settings.catalog_name or f"embedded sqlite under {settings.home.resolve()}",
        "workers": workers,
        "backlog": backlog.to_dict(),
        "summary": backlog.describe(now_ms),
        "dead_letters": DeadLetterStore(client).count(),
        "checks": checks(client),
        "tables": per_table,
        "at_ms": now_ms,
    }


def checks(client: redis.Redis) -> dict[str, Any]:
    """The canary's last probe and the sampled validation's last run (None before the first)."""
    from common.maintenance.sampling import last_run

    raw = client.get(keys.canary_last())
    return {"canary": orjson.loads(raw) if raw else None, "validation": last_run(client)}


def checks_lines(data: dict[str, Any]) -> list[Text]:
    """The canary's and the sampled validation's last results, as ``status`` lines."""
    now_ms = data["at_ms"]
    canary, validation = data["checks"]["canary"], data["checks"]["validation"]
    if canary is None:
        shown = "no probe yet"
    else:
        ok = canary.get("status") == "ok"
        shown = (
            f"[green]ok[/] {canary['latency_s']:.1f}s end to end"
            if ok
            else f"[red]{canary.get('status')}[/]"
        ) + f", {age_text(now_ms - int(canary.get('checked_ms') or now_ms))} ago"
    if validation is None:
        checked = "no run yet"
    else:
        failures = validation.get("failures", 0)
        checked = (
            f"{validation.get('files', 0)} file(s) in the last run, "
            + (f"[red]{failures} bad[/]" if failures else "[green]0 bad[/]")
            + f", {age_text(now_ms - int(validation.get('checked_ms') or now_ms))} ago; "
            f"{validation.get('failures_total', 0)} bad file(s) found in all"
        )
    lines = [Text.from_markup(f"[bold]canary[/] {shown}   [bold]validation[/] {checked}")]
    for bad in (validation or {}).get("bad_files", []):
        lines.append(Text.from_markup(f"  [red]bad[/] {escape(bad['file'])}"))
    return lines


def age_text(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(data: dict[str, Any], console: Console) -> None:
    console.print(renderable(data))


def renderable(data: dict[str, Any]) -> Group:
    """What ``status`` shows, as one rich renderable (printed once, or refreshed by --watch)."""
    backlog = data["backlog"]
    queued = backlog["queued"]
    lines: list[Any] = [
        Text.from_markup(
            f"[bold]Redis[/] {escape(data['redis_url'])}"
            + (f" ({escape(data['redis_from'])})" if data.get("redis_from") else "")
        ),
        Text.from_markup(
            f"[bold]catalog[/] {escape(data['catalog'])}"
            + (f" ({escape(data['catalog_from'])})" if data.get("catalog_from") else "")
        ),
    ]
    workers = data["workers"]
    if workers is not None:
        lines.append(
            Text.from_markup(
                f"[bold]workers[/] ({len(workers)}): {', '.join(workers) or 'none answering'}"
            )
        )
    oldest = backlog["oldest_outstanding_ms"]
    lines.append(
        Text.from_markup(
            f"[bold]queues[/] ingest {queued.get('ingest', 0)}, commit {queued.get('commit', 0)}, "
            f"delivered and unacknowledged {backlog['unacked']}   "
            f"[bold]batches[/] not written {backlog['outstanding']}"
            + (f" (oldest {age_text(data['at_ms'] - oldest)})" if oldest else "")
            + f", written not committed {sum(backlog['pending'].values())}   "
            f"[bold]prepared commits[/] {len(backlog['prepared'])}   "
            f"[bold]dead letters[/] {data['dead_letters']}"
        )
    )
    if "checks" in data:
        lines.extend(checks_lines(data))
    table = RichTable(title=None, show_edge=False, header_style="bold")
    for column in (
        "table",
        "snapshots",
        "files",
        "rows",
        "commit seq",
        "last commit",
        "pending",
        "lag",
        "duplicates",
    ):
        table.add_column(column, justify="left" if column == "table" else "right")
    # whole names, however narrow the terminal: the numbers wrap instead
    table.columns[0].min_width = max((len(row["table"]) for row in data["tables"]), default=5)
    for row in data["tables"]:
        table.add_row(
            row["table"],
            str(row.get("snapshots", "-")),
            f"{row.get('files', 0):,}",
            f"{row.get('rows', 0):,}",
            str(row.get("commit_seq", "-")),
            age_text(row.get("last_commit_age_ms"))
            + (" ago" if row.get("last_commit_age_ms") else ""),
            str(row["pending_batches"]),
            age_text(row["lag_ms"]) if row["lag_ms"] else "-",
            f"{row['duplicates_dropped']:,}"
            + (
                f" (+{row['duplicates_conflicting']:,} conflicting)"
                if row["duplicates_conflicting"]
                else ""
            ),
        )
    lines.append(table if data["tables"] else Text("no tables yet"))
    lines.append(Text(data["summary"]))
    return Group(*lines)


def watch_status(
    snapshot: Callable[[], dict[str, Any]],
    console: Console,
    interval_s: float,
    count: int | None = None,
) -> None:
    """Refresh ``renderable(snapshot())`` in place every ``interval_s`` until Ctrl-C (or
    ``count`` refreshes)."""
    shown = 0
    with Live(renderable(snapshot()), console=console, auto_refresh=False) as live:
        shown += 1
        try:
            while count is None or shown < count:
                time.sleep(interval_s)
                live.update(renderable(snapshot()), refresh=True)
                shown += 1
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends: not an error
