"""``icefleet send``: a file of events in, its valid events enqueued, the rest dead-lettered.

The file is read as bytes and cut and validated by the writer's own parser
(:func:`common.ingest.events.parse_batch`), as the HTTP gateway does: one line that is not UTF-8
or not JSON no longer refuses the whole file. Each refused item goes to the dead-letter store
with the record the writer makes (batch id, position, reason, attribute, the bytes as read), so
``icefleet dead-letters list|replay`` see it like any other; its position is the line index in
the file (0-based, blank lines counted) or the element index of a JSON array.

Kept apart from ``workers/cli/main.py``, which registers :data:`send`, and importing nothing from
it, so ``python -m workers.cli.main`` does not import the CLI module twice.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass

import click
from rich.console import Console
from rich.markup import escape

from common.coord.deadletters import DeadLetterStore
from common.errors import IcefleetError, OverloadedError
from common.ingest.events import DeadLetter, parse_batch
from common.ingest.producer import Producer
from common.ingest.routing import TableName
from common.wire import check_batch_id
from workers.cli.context import connect, load_context
from workers.cli.deadletters import preview
from workers.cli.errors import errors, fail

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
SHOWN_REFUSALS = 10  # refusals listed one per line; the rest are in `icefleet dead-letters list`


@dataclass
class SendReport:
    batch_ids: list[str]
    sent: int
    refused: list[DeadLetter]
    array: bool

    def where(self, letter: DeadLetter) -> str:
        """Where a refused item was, for a person: 1-based line, or the array's index."""
        return f"element [{letter.position}]" if self.array else f"line {letter.position + 1}"


def read_input(path: str) -> bytes:
    """The bytes of ``path`` (``-``: stdin), or one line saying why they cannot be read."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")


def is_array(payload: bytes) -> bool:
    """Whether ``parse_batch`` reads ``payload`` as a JSON array (positions are then indexes)."""
    return payload.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")[:1] == b"["


def send_payload(
    producer: Producer,
    store: DeadLetterStore,
    payload: bytes,
    *,
    table: str | None,
    batch_id: str,
    max_event_bytes: int,
) -> SendReport:
    """Enqueue the valid events of ``payload`` under ``batch_id``; dead-letter the others."""
    parsed = parse_batch(payload, batch_id=batch_id, max_event_bytes=max_event_bytes)
    ids: list[str] = []
    if parsed.events:
        ids = producer.enqueue_many(
            [event.raw for event in parsed.events], table=table, batch_id=batch_id
        )
    # After the enqueue: the events a failed enqueue did not send are still in the file.
    store.add(parsed.dead_letters, table=table)
    return SendReport(ids, len(parsed.events), parsed.dead_letters, is_array(payload))


def _waiting(exc: OverloadedError) -> None:
    console.print(
        f"the fleet is over its budget ({exc.in_use_batches}/{exc.max_batches} batches, "
        f"{exc.in_use_bytes:,}/{exc.max_bytes:,} bytes not written yet): "
        f"waiting {exc.retry_after_s}s"
    )


@click.command()
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--table", "-t", help="Send every event to this namespace.table.")
@click.option("--batch-id", help="Idempotency key: the same events under the same id land once.")
@click.option(
    "--max-wait",
    "max_wait_s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds to wait while the fleet is over its budget of work not yet written.",
)
def send(file: str, table: str | None, batch_id: str | None, max_wait_s: float) -> None:
    """Enqueue CloudEvents from FILE (- for stdin): NDJSON, a JSON array or a CloudEvents batch.

    Valid events are sent; items that are not UTF-8, not JSON or not valid CloudEvents are stored
    as dead letters with their position and reason (`icefleet dead-letters list`). Prints the ids
    of the batches sent, one per line, and on stderr what was sent and refused. Exits 1 when
    something was refused. While the fleet is over its budget of work not yet written it waits
    (saying so on stderr) up to --max-wait seconds, then fails having sent nothing more.
    """
    checks = ((table, TableName.parse, "--table"), (batch_id, check_batch_id, "--batch-id"))
    for value, check, hint in checks:
        if value is not None:
            try:
                check(value)
            except (IcefleetError, ValueError) as exc:
                raise click.BadParameter(str(exc), param_hint=hint) from None
    payload = read_input(file)
    if not payload.strip():
        fail(f"{file}: no events in it")
    with errors():
        context = load_context()
        client = connect(context)
    settings = context.settings
    with (
        errors(),
        Producer(
            settings, client=client, overload_wait_s=max_wait_s, on_overload=_waiting
        ) as producer,
    ):
        report = send_payload(
            producer,
            DeadLetterStore(client),
            payload,
            table=table,
            batch_id=batch_id or str(uuid.uuid4()),
            max_event_bytes=settings.max_event_bytes,
        )
    client.close()
    for batch in report.batch_ids:
        out.print(batch)
    for letter in report.refused[:SHOWN_REFUSALS]:
        reason = escape(preview(letter.reason.encode(), 160))
        console.print(f"refused {report.where(letter)}: {reason}")
    if len(report.refused) > SHOWN_REFUSALS:
        console.print(f"... and {len(report.refused) - SHOWN_REFUSALS} more")
    summary = f"{report.sent} event(s) sent in {len(report.batch_ids)} batch(es)"
    if report.refused:
        fail(
            f"{summary}; {len(report.refused)} refused and stored as dead letters "
            "(`icefleet dead-letters list`)"
        )
    console.print(summary)
