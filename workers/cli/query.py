"""``icefleet tables`` and ``icefleet query "SQL"``: look at the data without writing Python.

``query`` runs SQL with the embedded engine of :mod:`common.lake.query` (DataFusion over
iceberg-rust) and prints the rows as a table, or all of them as JSON (``--json``, an array of
objects) or CSV (``--csv``, nested values as JSON text). Neither command needs Redis: after
``icefleet demo`` stopped its fleet, the tables are still there to read. ``tables`` shows each
table's lag when a Redis is configured or a local fleet runs.

Kept apart from ``workers/cli/main.py``, which registers both commands, and importing nothing
from it, so ``python -m workers.cli.main`` does not import the CLI module twice.
"""

from __future__ import annotations

import base64
import csv
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import IO, Any

import click
import orjson
import pyarrow as pa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.lake.query import QueryEngine, sql_name
from workers.cli.context import connect, load_context, open_catalog_checked
from workers.cli.errors import errors
from workers.cli.status import age_text, oldest_pending_ms, table_stats

out = Console(highlight=False, soft_wrap=True)
console = Console(stderr=True, highlight=False, soft_wrap=True)


# --- tables --------------------------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tables(as_json: bool) -> None:
    """Every table of the catalog: its name as `icefleet query` reads it, rows, files,
    snapshots, the last commit, and the lag (the oldest batch written but not committed) when
    a Redis is configured or a local fleet runs."""
    with errors():
        context = load_context(needs_redis=False)
        client = connect(context) if context.redis_configured else None
        stats = table_stats(open_catalog_checked(context))
        lags: dict[str, int | None] | None = None
        if client is not None:
            lags = oldest_pending_ms(client, list(stats))
            client.close()
    now_ms = int(time.time() * 1000)
    rows: list[dict[str, Any]] = []
    for name, table in stats.items():
        oldest = lags.get(name) if lags is not None else None
        rows.append(
            {
                "table": name,
                "sql_name": sql_name(name.split(".")),
                "rows": table.rows,
                "files": table.files,
                "snapshots": table.snapshots,
                "last_commit_ms": table.last_commit_ms,
                "lag_ms": None if lags is None else (max(0, now_ms - oldest) if oldest else 0),
            }
        )
    if as_json:
        out.print(orjson.dumps(rows).decode(), markup=False)
        return
    if not rows:
        out.print("no tables yet: `icefleet send FILE` or `icefleet demo` creates them")
        return
    grid = Table(show_edge=False, header_style="bold")
    for column in ("table", "rows", "files", "snapshots", "last commit", "lag"):
        grid.add_column(column, justify="left" if column == "table" else "right")
    grid.columns[0].min_width = max(len(row["sql_name"]) for row in rows)  # whole names
    for row in rows:
        last = row["last_commit_ms"]
        grid.add_row(
            escape(row["sql_name"]),
            f"{row['rows']:,}",
            f"{row['files']:,}",
            str(row["snapshots"]),
            f"{age_text(now_ms - last)} ago" if last else "-",
            "?" if row["lag_ms"] is None else age_text(row["lag_ms"]) if row["lag_ms"] else "-",
        )
    out.print(grid)
    if lags is None:
        console.print("lag: unknown (no Redis configured and no local fleet running)")


# --- query ---------------------------------------------------------------------------------------


@click.command()
@click.argument("sql")
@click.option("--json", "fmt", flag_value="json", help="Every row, as a JSON array of objects.")
@click.option("--csv", "fmt", flag_value="csv", help="Every row, as CSV with a header.")
@click.option(
    "--max-rows",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Table output: rows shown (the rest are counted).",
)
def query(sql: str, fmt: str | None, max_rows: int) -> None:
    """Run SQL (- reads it from stdin) over the catalog's tables and print the result.

    Tables are named namespace.table as `icefleet tables` lists them, e.g.
    icefleet query "SELECT count(*) FROM events.order_placed". Data columns are top-level
    columns; nested objects are structs (customer.country or customer['country']). A name with
    capitals or a keyword is double-quoted: events."order". Read-only: no DDL, DML or SET.
    """
    if sql == "-":
        sql = sys.stdin.read()
    if not sql.strip():
        raise click.BadParameter("give a SQL query", param_hint="SQL")
    with errors():
        context = load_context(needs_redis=False)
        engine = QueryEngine(open_catalog_checked(context))
        schema, batches = engine.run(sql)
        if fmt == "json":
            write_json(schema, batches, sys.stdout)
        elif fmt == "csv":
            write_csv(schema, batches, sys.stdout)
        else:
            write_table(schema, batches, max_rows)


def _rows(batches: Iterable[pa.RecordBatch]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield from batch.to_pylist(maps_as_pydicts="lossy")


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: a float would round it
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _dumps(value: Any) -> str:
    option = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS
    return orjson.dumps(value, default=_json_default, option=option).decode("utf-8")


def cell(value: Any) -> str:
    """One value as text: scalars as themselves, timestamps in ISO 8601, nested values as JSON."""
    if value is None:
        return ""
    if isinstance(value, datetime | date | dtime):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return _dumps(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def write_json(schema: pa.Schema, batches: Iterable[pa.RecordBatch], stream: IO[str]) -> None:
    """An array of objects, one per row, written as the rows come (any result size)."""
    stream.write("[")
    separator = "\n"
    for row in _rows(batches):
        stream.write(separator + _dumps(row))
        separator = ",\n"
    stream.write("\n]\n" if separator != "\n" else "]\n")


def write_csv(schema: pa.Schema, batches: Iterable[pa.RecordBatch], stream: IO[str]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(schema.names)
    for batch in batches:
        for row in batch.to_pylist(maps_as_pydicts="lossy"):
            writer.writerow([cell(row[name]) for name in schema.names])


def write_table(schema: pa.Schema, batches: Iterable[pa.RecordBatch], max_rows: int) -> None:
    grid = Table(show_edge=False, header_style="bold")
    for field in schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        numeric = numeric or pa.types.is_decimal(field.type)
        grid.add_column(escape(field.name), justify="right" if numeric else "left")
    shown = total = 0
    for batch in batches:
        total += batch.num_rows
        for row in batch.slice(0, max(0, max_rows - shown)).to_pylist(maps_as_pydicts="lossy"):
            grid.add_row(
                *(
                    escape(cell(value)) if value is not None else "[dim]NULL[/]"
                    for value in row.values()
                )
            )
            shown += 1
    out.print(grid)
    more = f"; {total - shown:,} more not shown (--max-rows, LIMIT, or --csv/--json)"
    console.print(f"{total:,} row(s)" + (more if total > shown else ""))
