"""``icefleet dead-letters list|replay|purge``: events icefleet could not land, and a way back.

The commands and their printing only: the store is :mod:`common.coord.deadletters`, the
exactly-once replay (its batches, Lua and dedup of twice-stored inputs) :mod:`common.ingest.replay`.

Kept apart from ``workers/cli/main.py``, which registers :data:`dead_letters`, and importing nothing
from it, so ``python -m workers.cli.main`` does not import the CLI module twice.
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import orjson
import redis
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.coord.deadletters import DeadLetterStore, StoredDeadLetter
from common.errors import IcefleetError
from common.ingest.replay import REPLAYS_KEY, Replayer, routes_to
from common.ingest.routing import Router, TableName
from common.settings import Settings
from workers.cli.errors import errors

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

PREVIEW_CHARS = 80


@contextmanager
def _connected() -> Iterator[tuple[Settings, redis.Redis]]:
    from workers.cli.context import connect, load_context

    with errors():
        context = load_context()
        client = connect(context)
    try:
        with errors():
            yield context.settings, client
    finally:
        client.close()


def preview(raw: bytes, width: int = PREVIEW_CHARS) -> str:
    """The start of ``raw`` for a terminal: control and formatting characters (NUL, bidi
    overrides, newlines) shown as escapes, so a hostile input cannot rearrange the screen."""
    text = raw.decode("utf-8", "replace")
    shown = "".join(
        ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode()
        for ch in text[: width * 2]
    )
    return shown[:width] + ("..." if len(shown) > width or len(text) > width * 2 else "")


def letter_json(letter: StoredDeadLetter) -> dict[str, Any]:
    """A dead letter as JSON: ``raw`` as text, or base64 with ``raw_base64: true``."""
    try:
        raw, is_base64 = letter.raw.decode("utf-8"), False
    except UnicodeDecodeError:
        raw, is_base64 = base64.b64encode(letter.raw).decode("ascii"), True
    return {
        "id": letter.id,
        "batch_id": letter.batch_id,
        "position": letter.position,
        "table": letter.table,
        "reason": letter.reason,
        "attribute": letter.attribute,
        "at_ms": letter.at_ms,
        "raw": raw,
        "raw_base64": is_base64,
    }


# --- commands -------------------------------------------------------------------------------------


@click.group("dead-letters")
def dead_letters() -> None:
    """Events that could not be landed, with the reason: list, replay, purge."""


@dead_letters.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter (NDJSON).")
@click.option("--count", "-n", default=50, show_default=True, type=click.IntRange(1))
def list_dead_letters(as_json: bool, count: int) -> None:
    """Show the oldest COUNT dead letters: id, batch, table, reason and the input."""
    with _connected() as (_settings, client):
        store = DeadLetterStore(client)
        letters, total = store.list(count), store.count()
    if as_json:
        for letter in letters:
            out.print(orjson.dumps(letter_json(letter)).decode(), markup=False, highlight=False)
        return
    if not letters:
        out.print("no dead letters")
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("id", "batch", "pos", "table", "reason", "input"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        table.add_row(
            letter.id,
            escape(preview(letter.batch_id.encode(), 40)),
            str(letter.position),
            escape(letter.table or "-"),
            escape(preview(letter.reason.encode(), 120)),
            escape(preview(letter.raw)),
        )
    out.print(table)
    out.print(f"{len(letters)} of {total} dead letter(s)")


@dead_letters.command()
@click.option("--id", "ids", multiple=True, metavar="ID", help="A dead letter's id (repeatable).")
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter (of --table).")
@click.option("--table", "-t", help="Only dead letters of this namespace.table.")
def replay(ids: tuple[str, ...], replay_all: bool, table: str | None) -> None:
    """Send dead letters through the writers again; each lands once, however often this runs.

    Events still invalid go back to the dead letters with their new reason. Dead letters are
    removed only once their events are enqueued. --table keeps the dead letters recorded for
    that table or whose events route to it; replayed events go where they were first sent.
    """
    if bool(ids) == replay_all:
        raise click.UsageError("give either --id ID (repeatable) or --all")
    if table is not None:
        try:
            TableName.parse(table)
        except IcefleetError as exc:
            raise click.BadParameter(str(exc), param_hint="--table") from None
    with _connected() as (settings, client):
        if ids:
            letters, missing = DeadLetterStore(client).fetch(ids)
            for entry_id in missing:
                console.print(f"[yellow]no dead letter {escape(entry_id)}[/]")
        else:
            letters = list(DeadLetterStore(client).scan())
        if table is not None:
            router = Router(settings.routes, settings.namespace)
            letters = [letter for letter in letters if routes_to(letter, table, router)]
        report = Replayer(settings, client).replay(letters)
    for batch_id in report.batches:
        out.print(batch_id)
    console.print(
        f"{report.events} event(s) from {report.removed} dead letter(s) enqueued in "
        f"{len(report.batches)} batch(es); {report.still_invalid} still invalid, kept with "
        f"their reason; {report.duplicates} duplicate dead letter(s) dropped",
        highlight=False,
    )


@dead_letters.command()
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
def purge(yes: bool) -> None:
    """Delete every dead letter, for good."""
    with _connected() as (_settings, client):
        store = DeadLetterStore(client)
        total = store.count()
        if total and not yes:
            click.confirm(f"delete all {total} dead letter(s)?", abort=True, err=True)
        removed = store.purge()
        client.delete(REPLAYS_KEY)
    console.print(f"{removed} dead letter(s) deleted", highlight=False)


__all__ = ["dead_letters", "letter_json", "preview"]
