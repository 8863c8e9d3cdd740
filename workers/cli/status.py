"""``icefleet status``: queues, the backlog, dead letters, the canary and the sampled validation,
and per table its snapshots, files, rows and the last commit with its lag. Also the per-table
figures the demo prints."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from common.commit.committer import committed_seq
from common.coord import keys
from common.coord.backlog import Backlog, read_backlog
from common.coord.deadletters import DeadLetterStore
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
    per_table = []
    for name in names:
        stats = tables.get(name)
        pending_since = oldest.get(name)
        row: dict[str, Any] = asdict(stats) if stats else {"table": name}
        row["pending_batches"] = backlog.pending.get(name, 0)
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


def render_checks(data: dict[str, Any], console: Console) -> None:
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
        ) + f", {_age(now_ms - int(canary.get('checked_ms') or now_ms))} ago"
    if validation is None:
        checked = "no run yet"
    else:
        failures = validation.get("failures", 0)
        checked = (
            f"{validation.get('files', 0)} file(s) in the last run, "
            + (f"[red]{failures} bad[/]" if failures else "[green]0 bad[/]")
            + f", {_age(now_ms - int(validation.get('checked_ms') or now_ms))} ago; "
            f"{validation.get('failures_total', 0)} bad file(s) found in all"
        )
    console.print(f"[bold]canary[/] {shown}   [bold]validation[/] {checked}")
    for bad in (validation or {}).get("bad_files", []):
        console.print(f"  [red]bad[/] {escape(bad['file'])}")


def _age(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(data: dict[str, Any], console: Console) -> None:
    backlog = data["backlog"]
    queued = backlog["queued"]
    console.print(f"[bold]Redis[/] {data['redis_url']}   [bold]catalog[/] {data['catalog']}")
    workers = data["workers"]
    if workers is not None:
        console.print(
            f"[bold]workers[/] ({len(workers)}): {', '.join(workers) or 'none answering'}"
        )
    oldest = backlog["oldest_outstanding_ms"]
    console.print(
        f"[bold]queues[/] ingest {queued.get('ingest', 0)}, commit {queued.get('commit', 0)}, "
        f"delivered and unacknowledged {backlog['unacked']}   "
        f"[bold]batches[/] not written {backlog['outstanding']}"
        + (f" (oldest {_age(data['at_ms'] - oldest)})" if oldest else "")
        + f", written not committed {sum(backlog['pending'].values())}   "
        f"[bold]prepared commits[/] {len(backlog['prepared'])}   "
        f"[bold]dead letters[/] {data['dead_letters']}"
    )
    render_checks(data, console)
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
    ):
        table.add_column(column, justify="left" if column == "table" else "right")
    for row in data["tables"]:
        table.add_row(
            row["table"],
            str(row.get("snapshots", "-")),
            f"{row.get('files', 0):,}",
            f"{row.get('rows', 0):,}",
            str(row.get("commit_seq", "-")),
            _age(row.get("last_commit_age_ms")) + (" ago" if row.get("last_commit_age_ms") else ""),
            str(row["pending_batches"]),
            _age(row["lag_ms"]) if row["lag_ms"] else "-",
        )
    if data["tables"]:
        console.print(table)
    else:
        console.print("no tables yet")
    console.print(data["summary"])
