"""The maintenance commands of ``icefleet``: compact, expire-snapshots, remove-orphans, delete,
verify, sync-catalog.

Registered on the main group by :func:`register` (``workers/cli/main.py`` calls it) and importing
nothing from ``workers.cli.main``, so ``python -m workers.cli.main`` does not import that module twice.
Every catalog change goes through the table's lock, so these are safe to run while the fleet is
up; the same operations run on a schedule in the committer (:mod:`workers.tasks.maintenance`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from common.durations import format_duration, parse_duration
from workers.cli.errors import errors
from workers.cli.errors import fail as _fail

if TYPE_CHECKING:
    from common.maintenance.maintainer import Maintainer

out = Console(highlight=False, soft_wrap=True)


@contextmanager
def _errors() -> Iterator[None]:
    """icefleet's own errors, bad table names and unknown tables: one line and exit 1."""
    from pyiceberg.exceptions import NoSuchTableError

    with errors(NoSuchTableError, ValueError):
        yield


@contextmanager
def _maintainer(*, needs_redis: bool = True) -> Iterator[Maintainer]:
    import redis

    from common.maintenance.maintainer import Maintainer
    from workers.cli.context import connect, load_context, open_catalog_checked

    with _errors():
        context = load_context(needs_redis)
        settings = context.settings
        # maintenance takes the table locks in Redis; verify only reads (its client never connects)
        client = (
            connect(context)
            if needs_redis
            else redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        )
        try:
            yield Maintainer(settings, open_catalog_checked(context), client)
        finally:
            client.close()


class Duration(click.ParamType):
    """``7d``, ``12h``, ``30m``, ``0s``... as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value)).total_seconds()
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


TABLES = click.argument("tables", nargs=-1, metavar="[TABLE]...")
DRY_RUN = click.option("--dry-run", is_flag=True, help="Report what would be done; change nothing.")


def _mib(size: int) -> str:
    return f"{size / 1_048_576:,.1f} MiB"


# --- compact -------------------------------------------------------------------------------------


@click.command()
@TABLES
@click.option(
    "--target-size", "target_bytes", type=click.IntRange(1), help="Bytes per output file."
)
@click.option(
    "--fraction", type=click.FloatRange(0, 1, min_open=True), help="Small: under this x target."
)
@click.option("--min-files", type=click.IntRange(2), help="Small files a partition needs.")
@DRY_RUN
def compact(
    tables: tuple[str, ...],
    target_bytes: int | None,
    fraction: float | None,
    min_files: int | None,
    dry_run: bool,
) -> None:
    """Rewrite the small files of each partition into target-size files, one snapshot per table.

    No TABLE: every table in the catalog. Defaults come from ICEFLEET_COMPACT_* (128 MiB target,
    files under 0.75 of it are small, at least 5 per partition).
    """
    with _maintainer() as m, _errors():
        options = m.compaction_options(
            target_file_size_bytes=target_bytes, small_file_fraction=fraction, min_files=min_files
        )
        for table in m.table_names(tables):
            if dry_run:
                plan = m.plan(table, options)
                out.print(
                    f"{table}: would compact {plan.files} file(s), {_mib(plan.bytes)}, "
                    f"in {len(plan.groups)} partition(s)"
                )
                continue
            started = time.perf_counter()
            result = m.compact(table, options)
            if not result.rewritten_files:
                out.print(f"{table}: nothing to compact ({result.files_before} file(s))")
                continue
            out.print(
                f"{table}: {result.rewritten_files} file(s) ({_mib(result.rewritten_bytes)}, "
                f"{result.records:,} rows) rewritten into {result.written_files} in "
                f"{result.groups} partition(s); {result.files_before} → {result.files_after} "
                f"files in {time.perf_counter() - started:.1f}s"
            )


# --- expire-snapshots ----------------------------------------------------------------------------


@click.command("expire-snapshots")
@TABLES
@click.option("--older-than", "older_than_s", type=Duration(), help="e.g. 7d, 12h, 0s.")
@click.option("--retain-last", type=click.IntRange(1), help="Always keep the newest N.")
@DRY_RUN
def expire_snapshots(
    tables: tuple[str, ...], older_than_s: float | None, retain_last: int | None, dry_run: bool
) -> None:
    """Expire snapshots older than a duration (keeping the newest N and the current one), and
    delete the data files, manifests, manifest lists and metadata files only they referenced.

    Defaults: ICEFLEET_EXPIRE_OLDER_THAN (15m) and ICEFLEET_EXPIRE_RETAIN_LAST (100).
    """
    from common.maintenance.expiry import ExpiryPolicy

    with _maintainer() as m, _errors():
        policy = ExpiryPolicy(
            m.settings.expire_older_than_s if older_than_s is None else older_than_s,
            m.settings.expire_retain_last if retain_last is None else retain_last,
        )
        for table in m.table_names(tables):
            report = m.expire(table, policy, dry_run=dry_run)
            verb = "would expire" if dry_run else "expired"
            out.print(
                f"{table}: {verb} {len(report.expired_snapshot_ids)} snapshot(s) older than "
                f"{format_duration(policy.older_than_s)} ({report.retained_snapshots} kept); "
                f"{'would delete' if dry_run else 'deleted'} {report.deleted_data_files} data "
                f"file(s), {report.deleted_manifests} manifest(s), "
                f"{report.deleted_manifest_lists} manifest list(s), "
                f"{report.deleted_metadata_files} metadata file(s)"
            )


# --- remove-orphans ------------------------------------------------------------------------------


@click.command("remove-orphans")
@TABLES
@click.option("--older-than", "older_than_s", type=Duration(), help="Minimum age (default 3d).")
@DRY_RUN
def remove_orphans(tables: tuple[str, ...], older_than_s: float | None, dry_run: bool) -> None:
    """Delete files under each table's location that no metadata references and that are older
    than the minimum age (ICEFLEET_ORPHAN_MIN_AGE, 3d). Pending files are never deleted."""
    with _maintainer() as m, _errors():
        for table in m.table_names(tables):
            report = m.remove_orphans(table, older_than_s, dry_run=dry_run)
            for path in report.orphans if dry_run else ():
                out.print(f"  {path}")
            out.print(
                f"{table}: {len(report.orphans)} orphan(s), {_mib(report.orphan_bytes)} "
                f"{'found (dry run)' if dry_run else f'deleted ({report.deleted})'}; "
                f"{report.listed} file(s) listed, {report.pending} pending and "
                f"{report.too_young} too young kept"
            )


# --- delete --------------------------------------------------------------------------------------


@click.command()
@click.argument("table")
@click.option("--where", required=True, help="Row filter, e.g. \"subject = 'user-42'\".")
@click.option(
    "--commit-pending/--no-commit-pending",
    default=True,
    show_default=True,
    help="Commit the table's pending batches first, so their matching rows are deleted too.",
)
def delete(table: str, where: str, commit_pending: bool) -> None:
    """Delete the rows of TABLE matching a filter (copy-on-write), under the table lock."""
    with _maintainer() as m, _errors():
        (name,) = m.table_names([table])
        if commit_pending:
            from common.commit.committer import Committer

            Committer(m.settings, m.catalog, m.client, m.registry).commit_table(name)
        removed = m.delete(name, where)
    out.print(f"{name}: {removed:,} row(s) deleted where {where}")


# --- verify --------------------------------------------------------------------------------------


@click.command()
@TABLES
@click.option(
    "--deep",
    is_flag=True,
    help="Read every page of every live file with its checksum checked, and check row counts "
    "and column statistics (min/max/null counts) against the manifests.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per table, one per line.")
def verify(tables: tuple[str, ...], deep: bool, as_json: bool) -> None:
    """Check that every live file exists with the size its manifest says and that Parquet
    footers agree with the record counts (--deep: every page, rows and statistics too). Exit 1
    with a report naming each bad file on any problem."""
    import json

    from common.maintenance.verify import verify_table

    failed = 0
    with _maintainer(needs_redis=False) as m, _errors():
        for table in m.table_names(tables):
            with _progress(table, enabled=deep and not as_json) as progress:
                report = verify_table(m.load(table), deep=deep, progress=progress)
            failed += not report.ok
            if as_json:
                click.echo(json.dumps(report.to_dict()))
                continue
            status = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
            out.print(
                f"{table}: {status}: {report.files} file(s), {_mib(report.bytes)}, "
                f"{report.records:,} rows" + (" (deep: every page read)" if deep else "")
            )
            for problem in report.problems:
                out.print(f"  {escape(problem)}")
            for note in report.notes:
                out.print(f"  [yellow]note[/] {escape(note)}")
            if report.bad_files:
                out.print(
                    f"  {len(report.bad_files)} bad file(s); to take one out of the table: "
                    f"icefleet quarantine {table} FILE (docs/integrity.md)"
                )
    if failed:
        _fail(f"{failed} table(s) failed verification")


@contextmanager
def _progress(table: str, *, enabled: bool) -> Iterator[Any]:
    """A rich progress bar fed by verify_table's ``progress`` callback (None when disabled)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[bold]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(table, total=None)
        started = False

        def advance(count: int) -> None:
            nonlocal started
            if not started:  # the first call says how many files there are
                bar.update(task, total=count)
                started = True
            else:
                bar.advance(task, count)

        yield advance


# --- sync-catalog --------------------------------------------------------------------------------


@click.command("sync-catalog")
@DRY_RUN
def sync_catalog(dry_run: bool) -> None:
    """Register the tables whose metadata is in the warehouse but not in the catalog (newest
    metadata version); report catalog entries that point at older metadata than the newest."""
    with _maintainer() as m, _errors():
        report = m.sync_catalog(dry_run=dry_run)
    for name, location in report.registered:
        out.print(f"{'would register' if dry_run else 'registered'} {name}: {location}")
    for name, current, newest in report.stale:
        out.print(
            f"[yellow]stale[/] {name}: the catalog points at {current}, the warehouse has the "
            f"newer {newest} (not changed: check it, then re-register by hand if it is right)"
        )
    for note in report.notes:
        out.print(f"[yellow]note[/] {escape(note)}")
    out.print(
        f"{len(report.registered)} registered, {len(report.in_sync)} in sync, "
        f"{len(report.stale)} stale in {report.warehouse}"
    )


COMMANDS = (compact, expire_snapshots, remove_orphans, delete, verify, sync_catalog)


def register(group: click.Group) -> None:
    """Add the maintenance commands to ``group`` (the ``icefleet`` main group)."""
    for command in COMMANDS:
        group.add_command(command)
