"""The ``icefleet`` command line: demo, up, send, wait, status, worker (design.md §5).

Every command finds its Redis and catalog through :mod:`workers.cli.context` (the variables, else
the record of a local fleet under ICEFLEET_HOME) and fails with one line (:mod:`workers.cli.errors`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from typing import Any

import click
from rich.console import Console

from common.redaction import redact_url
from common.settings import Settings
from workers.cli.context import FROM_ENV, Context, connect, load_context
from workers.cli.errors import errors as _errors
from workers.cli.errors import fail as _fail

console = Console(stderr=True)
out = Console()
POOLS = ("prefork", "solo")  # one BatchWriter per process: no thread pools
# How long a long-running command (up, demo, worker) waits for a configured Redis to answer:
# services started together may come up in any order. A refused password fails at once.
STARTUP_WAIT_S = 5.0
#: ICEFLEET_COMMIT_INTERVAL_MS for the fleet of `icefleet demo` (see demo)
DEMO_COMMIT_INTERVAL_MS = 200


def _context(needs_redis: bool = True) -> Context:
    with _errors():
        return load_context(needs_redis)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="icefleet")
def main() -> None:
    """Land CloudEvents in Apache Iceberg tables with a fleet of Celery workers.

    Configuration comes from ICEFLEET_* variables; the catalog from .pyiceberg.yaml or
    PYICEBERG_CATALOG__<NAME>__* chosen by ICEFLEET_CATALOG. With nothing configured, everything
    lives under ./.icefleet (SQLite catalog, local warehouse, Redis files).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# --- demo ------------------------------------------------------------------------------------------


@main.command()
@click.option("--events", "-n", default=100_000, show_default=True, type=click.IntRange(1))
@click.option("--writers", "-k", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--batch-size", default=2_000, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=7, show_default=True, help="Seed of the synthetic events.")
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default="solo",
    show_default=True,
    help="solo: each worker runs its tasks in its own process and stops at once; prefork adds a "
    "pool process per worker with per-task time limits (what `up` runs), and takes a second or "
    "two more to stop.",
)
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="Seconds.")
@click.option("--timings", is_flag=True, help="Print how long each phase took (to stderr).")
def demo(
    events: int,
    writers: int,
    batch_size: int,
    seed: int,
    pool: str,
    timeout_s: float,
    timings: bool,
) -> None:
    """Start Redis, WRITERS writers and a committer, send EVENTS synthetic events, wait until all
    are committed, read them back, print throughput and the tables, and stop everything again."""
    from workers.cli.demo import Phases
    from workers.fleet import signals_raise_keyboard_interrupt

    phases = Phases()
    # The committer groups what the writers registered for this long before it commits: 1 s by
    # default, a trade of freshness for fewer snapshots under steady load. A demo is about
    # seeing rows land, so its fleet commits after 200 ms unless the variable says otherwise.
    os.environ.setdefault("ICEFLEET_COMMIT_INTERVAL_MS", str(DEMO_COMMIT_INTERVAL_MS))
    context = _context(needs_redis=False)
    # The workers are forked from this process once it has imported what they need: see Fleet.
    fleet = _prepare_fleet(context, writers=writers, pool=pool, fork_with=main)
    record = ExitStack()  # closed after the fleet stopped: see _record
    report = None
    with record, _errors(), signals_raise_keyboard_interrupt():
        try:
            console.print("starting Redis, writers and the committer...", highlight=False)
            fleet.start()  # not under a spinner: its thread would stop the workers being forked
            phases.mark("start")
            _record(record, fleet, "demo")
            with console.status("waiting for the workers to answer..."):
                fleet.wait_ready()
            phases.mark("ready")
            console.print(
                f"fleet up: {writers} writer(s) and a committer ({pool} pool), "
                f"Redis {redact_url(fleet.settings.redis_url)}\nlogs: {fleet.log_dir}",
                highlight=False,
                soft_wrap=True,
            )
            report = _run_demo(fleet, events, batch_size, seed, timeout_s, phases)
            phases.mark("verify")
        except KeyboardInterrupt:
            console.print("interrupted: stopping the fleet")
            raise SystemExit(130) from None
        except (TimeoutError, RuntimeError) as exc:
            _fail(str(exc), keep_lines=True)
        finally:
            with console.status("stopping the fleet..."):
                # every batch is committed once the report is made: nothing is in flight
                fleet.stop(idle=report is not None)
            phases.mark("stop")
    _print_report(report, context.settings)
    if timings:
        console.print(phases.describe(), highlight=False, soft_wrap=True)
    # Everything is stopped, recorded and printed: skip the interpreter's teardown (freeing
    # pyiceberg's, pyarrow's and Celery's modules one by one: half a second or more).
    _exit_at_once(0)


def _prepare_fleet(context: Context, **options: Any) -> Any:
    """A local fleet for ``up``/``demo``, after the checks that make starting it pointless:
    another fleet already running from this home, a configured Redis or the catalog unusable."""
    from workers.cli.context import open_catalog_checked
    from workers.fleet import Fleet

    if context.record is not None:
        _fail(
            f"{context.record.describe()} is running: stop it first (Ctrl-C in its terminal), "
            "or use another ICEFLEET_HOME"
        )
    spawn_redis = context.redis_from != FROM_ENV
    with _errors():
        if not spawn_redis:
            connect(context, wait_s=STARTUP_WAIT_S).close()
        open_catalog_checked(context)
    return Fleet(context.settings, spawn_redis=spawn_redis, **options)


def _record(stack: ExitStack, fleet: Any, command: str) -> Any:
    """Record the fleet under its home (its Redis answers by now) until ``stack`` closes.

    Removed only after the fleet stopped: a command run meanwhile finds a record whose Redis
    is going away (a clear error), never no record (the default port, maybe another Redis).
    """
    from workers.fleet_record import recorded

    settings = fleet.settings
    return stack.enter_context(
        recorded(settings.redis_url, settings.catalog_name, fleet.home, command)
    )


def _run_demo(
    fleet: Any, events: int, batch_size: int, seed: int, timeout_s: float, phases: Any
) -> Any:
    """Send, wait until all is committed, then read it back while the idle workers stop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from common.ingest.producer import Producer
    from common.lake.catalog import open_catalog
    from workers.cli import demo as demo_mod

    settings = fleet.settings
    catalog = open_catalog(settings)
    columns = (
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Producer(settings) as producer, Progress(*columns, console=console) as progress:
        sent = progress.add_task("events enqueued", total=events, rate="")
        done = progress.add_task("rows committed", total=events, rate="")
        started = time.monotonic()

        def on_progress(enqueued: int, committed: int) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            progress.update(sent, completed=enqueued)
            progress.update(
                done, completed=max(committed, 0), rate=f"{max(committed, 0) / elapsed:,.0f}/s"
            )

        report = demo_mod.run_demo(
            settings,
            catalog,
            producer,
            events=events,
            batch_size=batch_size,
            seed=seed,
            timeout_s=timeout_s,
            on_progress=on_progress,
            phases=phases,
        )
    # Everything is committed: nothing is in flight, so the workers may wind down while the
    # rows are read back (Redis stays up until they are gone).
    fleet.terminate_workers()
    report.read_back = demo_mod.read_back(catalog, report)
    return report


def _print_report(report: Any, settings: Settings) -> None:
    from rich.table import Table

    from workers.cli import demo as demo_mod

    table = Table(show_edge=False, header_style="bold")
    table.add_column("table", no_wrap=True)
    for column in ("events sent", "rows added", "commits", "files", "rows total"):
        table.add_column(column, justify="right")
    for name, sent in report.sent.items():
        after = report.after.get(name)
        table.add_row(
            name,
            f"{sent:,}",
            f"{report.added(name, 'rows'):,}",
            f"{report.added(name, 'commit_seq'):,}",
            f"{after.files if after else 0:,}",
            f"{after.rows if after else 0:,}",
        )
    out.print(
        f"\n[bold]{report.events:,} events committed in {report.seconds:.1f}s: "
        f"{report.events_per_s:,.0f} events/s[/] ({len(report.batches)} batches)"
    )
    out.print(table)
    if report.dead_letters:
        out.print(f"[yellow]{report.dead_letters} dead letter(s): see `icefleet status`[/]")
    if report.read_back is not None:
        out.print(report.read_back.describe(), highlight=False)
    where = settings.catalog_name or f"SQLite catalog and warehouse under {settings.home.resolve()}"
    out.print(f"tables: {where}", highlight=False)
    if report.rows_added == sum(report.sent.values()) - report.dead_letters:
        out.print("look at the data:", highlight=False)
        for command in demo_mod.next_commands(settings):
            out.print(f"  {command}", markup=False, highlight=False, soft_wrap=True)
    if report.rows_added != sum(report.sent.values()) - report.dead_letters:
        _fail(f"rows added ({report.rows_added}) do not match the events sent ({report.events})")
    read_back = report.read_back
    if read_back is not None and (
        read_back.duplicated or read_back.unexpected or read_back.missing != report.dead_letters
    ):
        _fail(read_back.describe())


# --- up --------------------------------------------------------------------------------------------


@main.command()
@click.option("--writers", "-k", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--flower",
    is_flag=True,
    help="Also serve Flower on 127.0.0.1:5555, with basic auth (ICEFLEET_FLOWER_BASIC_AUTH, "
    "else a random password printed here).",
)
@click.option("--flower-port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--pool", type=click.Choice(POOLS), default="prefork", show_default=True)
def up(writers: int, flower: bool, flower_port: int, pool: str) -> None:
    """Run the local fleet in the foreground until Ctrl-C, restarting processes that die.

    Its Redis URL and catalog are recorded in ICEFLEET_HOME/fleet.json while it runs: the other
    commands, run with the same ICEFLEET_HOME, use them when ICEFLEET_REDIS_URL is unset.
    """
    from workers.fleet import signals_raise_keyboard_interrupt
    from workers.fleet_record import keep_recorded

    context = _context(needs_redis=False)
    fleet = _prepare_fleet(
        context, writers=writers, flower=flower, flower_port=flower_port, pool=pool, fork_with=main
    )
    records = ExitStack()  # closed after the fleet stopped: see _record
    with records, _errors(), signals_raise_keyboard_interrupt():
        try:
            console.print("starting the fleet...")
            fleet.start()  # not under a spinner: its thread would stop the workers being forked
            record = _record(records, fleet, "up")
            with console.status("waiting for the workers to answer..."):
                fleet.wait_ready()
            console.print(f"[bold green]fleet up[/]: {', '.join(fleet.worker_names())}")
            console.print(
                f"  Redis {redact_url(fleet.settings.redis_url)}, recorded in {record.path}: "
                f"icefleet commands run from this directory (or with ICEFLEET_HOME={fleet.home}) "
                "use it",
                highlight=False,
                soft_wrap=True,
            )
            console.print(f"  logs: {fleet.log_dir}", highlight=False)
            if flower and fleet.flower_auth is not None:
                user, _, password = fleet.flower_auth.partition(":")
                given = fleet.settings.flower_basic_auth is not None
                login = f"user {user}, " + (
                    "password from ICEFLEET_FLOWER_BASIC_AUTH" if given else f"password {password}"
                )
                console.print(
                    f"  Flower: http://127.0.0.1:{flower_port} ({login})", highlight=False
                )
            console.print("Ctrl-C stops everything")
            while True:
                for name in fleet.supervise_once():
                    console.print(f"[yellow]restarted {name}[/]")
                keep_recorded(record)
                time.sleep(1.0)
        except KeyboardInterrupt:
            console.print("stopping the fleet...")
        except (TimeoutError, RuntimeError) as exc:
            _fail(str(exc), keep_lines=True)
        finally:
            fleet.stop()


# --- send / wait / status --------------------------------------------------------------------------


@main.command()
@click.option("--timeout", "timeout_s", type=click.FloatRange(0), help="Give up after S seconds.")
@click.option(
    "--batch-id",
    "batch_ids",
    multiple=True,
    metavar="ID",
    help="Wait for these batches only (the ids `icefleet send` printed); repeatable.",
)
def wait(timeout_s: float | None, batch_ids: tuple[str, ...]) -> None:
    """Block until everything enqueued so far is committed; exit 1 with what is still pending.

    "So far" is the moment `wait` starts: batches enqueued later (producers keep sending) are
    not waited for. Batches that were dead-lettered count as done (see `icefleet status`), and
    the rest of a batch a writer split (`<id>~<offset>`) is waited for with it.
    """
    from common.ingest.producer import Producer

    context = _context()
    with _errors():
        client = connect(context)
        with Producer(context.settings, client=client) as producer:
            result = producer.wait(timeout_s, batch_ids=batch_ids or None)
        client.close()
    if not result.done:
        _fail(f"not committed after {timeout_s}s: " + result.describe())
    out.print(result.describe())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-workers", is_flag=True, help="Don't ping the workers (saves a second).")
@click.option("--watch", "-w", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option(
    "--interval", default=2.0, show_default=True, type=click.FloatRange(0.1), help="Seconds."
)
@click.option("--count", type=click.IntRange(1), help="With --watch: stop after N refreshes.")
def status(
    as_json: bool, no_workers: bool, watch: bool, interval: float, count: int | None
) -> None:
    """Queues, batches not yet committed, dead letters, and per table: snapshots, files, rows,
    the last commit and the lag. Says which Redis and catalog it looked at, and why those."""
    from workers.cli.context import open_catalog_checked
    from workers.cli.status import collect, render, watch_status

    if watch and as_json:
        raise click.UsageError("--watch refreshes a table for people: leave out --json")
    context = _context()
    settings = context.settings
    with _errors():
        client = connect(context)
        catalog = open_catalog_checked(context)

        def snapshot() -> dict[str, Any]:
            workers = None if no_workers else _ping_workers(settings)
            return {**collect(settings, client, catalog, workers), **context.status()}

        if watch:
            watch_status(snapshot, out, interval, count)
            return
        data = snapshot()
        client.close()
    if as_json:
        out.print_json(json.dumps(data))
    else:
        render(data, out)


def _ping_workers(settings: Settings) -> list[str]:
    from workers.app import create_app

    app = create_app(settings)
    try:
        replies = app.control.ping(timeout=1.0) or []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)


# --- worker ----------------------------------------------------------------------------------------


@main.command()
@click.argument("role", type=click.Choice(["writer", "committer"]))
@click.option("--name", help="Worker name (default: the role); @<hostname> is appended.")
@click.option("--pool", type=click.Choice(POOLS), default="prefork", show_default=True)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1),
    help="Processes: writers default to 1, the committer to ICEFLEET_COMMIT_CONCURRENCY (each "
    "process commits one table at a time; the table lock keeps each table serial).",
)
@click.option(
    "--beat/--no-beat",
    default=True,
    show_default=True,
    help="Committer only: run the periodic commit sweep (one committer per fleet should).",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker(
    role: str, name: str | None, pool: str, concurrency: int | None, beat: bool, loglevel: str
) -> None:
    """Run a writer (queue ingest) or the committer (queue commit) in the foreground.

    The same as `celery -A workers.app worker -Q ingest|commit`, with icefleet's defaults.
    """
    from common.wire import COMMIT_QUEUE, INGEST_QUEUE
    from workers.app import create_app, run_worker

    context = _context()
    with _errors():  # fail with one line now, not in Celery's endless connection retries
        connect(context, wait_s=STARTUP_WAIT_S).close()
    settings = context.settings
    if concurrency is None:
        concurrency = settings.commit_concurrency if role == "committer" else 1
    settings.home.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule file there
    queue = COMMIT_QUEUE if role == "committer" else INGEST_QUEUE
    with _errors():
        try:
            code = run_worker(
                create_app(settings),
                queue=queue,
                hostname=f"{name or role}@%h",
                pool=pool,
                concurrency=concurrency,
                loglevel=loglevel,
                beat=role == "committer" and beat,
            )
        except SystemExit as exc:
            _exit_at_once(exc.code)
        _exit_at_once(code)


def _exit_at_once(code: object) -> None:
    """Leave a worker that has shut down without tearing the interpreter down.

    Celery's warm shutdown has run (tasks finished or put back, beat's schedule saved); what is
    left is freeing the objects of pyiceberg, pyarrow and every module one by one, which took
    seconds per worker on a busy 2-core machine and made a fleet slow to stop.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


from workers.cli.send import send  # noqa: E402

main.add_command(send)

from workers.cli.query import query, tables  # noqa: E402

main.add_command(tables)
main.add_command(query)

from workers.cli.serve import serve  # noqa: E402  (a module of its own: the HTTP gateway)

main.add_command(serve)

from workers.cli.evolve import evolve  # noqa: E402

main.add_command(evolve)

from workers.cli.maintenance import register as register_maintenance  # noqa: E402

register_maintenance(main)  # compact, expire-snapshots, remove-orphans, delete, verify, ...

from workers.cli.quarantine import quarantine  # noqa: E402

main.add_command(quarantine)

from workers.cli.deadletters import dead_letters  # noqa: E402

main.add_command(dead_letters)

if __name__ == "__main__":
    main()
