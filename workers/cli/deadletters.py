"""``icefleet dead-letters list|replay|purge``: events icefleet could not land, and a way back.

Dead letters live in the Redis stream ``icefleet:dead-letters`` (:mod:`common.coord.deadletters`), each
with the input exactly as received and the reason. ``replay`` sends them through the producer
again, exactly once however often it is run or wherever it is interrupted:

1. each selected dead letter not yet *assigned* to a replay batch is assigned to one, in one
   atomic step per batch (``icefleet:replays``: dead-letter id → batch id, plus the batch's
   members). The batch id is a digest of its members' ids, ``replay-<24 hex>``;
2. each batch is enqueued with exactly its members' events under its id, so sending it again
   (a replay run twice, or resumed after a crash) is deduplicated like any resent batch;
3. only after the enqueue are its dead letters deleted, and the assignment forgotten.

The same input can be dead-lettered twice (a writer killed after storing its dead letters and
before acknowledging its task stores them again on redelivery): a dead letter whose origin (batch
id, position and bytes) was already replayed, or is being replayed, within the dedup window
(``icefleet:replayed:<digest>``) is deleted as a duplicate instead of being sent again.

Before sending, every event is validated as the writer would: one still invalid goes back to the
stream with its new reason (and the old one, and the same batch id and position) instead of
being sent; the writer dead-letters with a reason whatever it still cannot land (a schema that
still does not fit). A dead letter holding a whole batch (a batch that kept failing) is replayed
event by event.

Kept apart from ``workers/cli/main.py``, which registers :data:`dead_letters`, and importing nothing
from it, so ``python -m workers.cli.main`` does not import the CLI module twice.
"""

from __future__ import annotations

import base64
import hashlib
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import click
import orjson
import redis
from redis.typing import EncodableT, FieldT
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.coord import keys
from common.coord.deadletters import DeadLetterStore, StoredDeadLetter
from common.errors import IcefleetError
from common.ingest.events import DeadLetter, parse_batch, split_events
from common.ingest.routing import Router, TableName
from common.settings import Settings
from workers.cli.errors import errors

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

REPLAYS_KEY = keys.replays()  # hash: dead-letter id → batch id; batch:<id> → members
REPLAY_BATCH_LETTERS = 1_000  # dead letters per replay batch (the producer splits large ones)
PAGE = 1_000
PREVIEW_CHARS = 80

# KEYS: replays hash; ARGV: batch id, members JSON, dead-letter ids... → 1 assigned, 0 taken
_ASSIGN_LUA = """
for i = 3, #ARGV do
  if redis.call('hexists', KEYS[1], ARGV[i]) == 1 then
    return 0
  end
end
for i = 3, #ARGV do
  redis.call('hset', KEYS[1], ARGV[i], ARGV[1])
end
redis.call('hset', KEYS[1], 'batch:' .. ARGV[1], ARGV[2])
return 1
"""


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


def all_letters(store: DeadLetterStore) -> Iterator[StoredDeadLetter]:
    start = "-"
    while page := store.list(PAGE, start):
        yield from page
        start = "(" + page[-1].id


def fetch(client: redis.Redis, ids: list[str]) -> tuple[list[StoredDeadLetter], list[str]]:
    """The dead letters with these stream ids, in stream order; and the ids not found."""
    store = DeadLetterStore(client)
    found: dict[str, StoredDeadLetter] = {}
    for entry_id in dict.fromkeys(ids):
        try:
            page = store.list(1, entry_id)
        except redis.ResponseError:  # not a stream id at all
            continue
        if page and page[0].id == entry_id:
            found[entry_id] = page[0]
    letters = sorted(found.values(), key=lambda letter: _stream_order(letter.id))
    return letters, [i for i in ids if i not in found]


def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _items(letter: StoredDeadLetter) -> list[bytes]:
    return split_events(letter.raw) or [letter.raw]


def routes_to(letter: StoredDeadLetter, table: str, router: Router) -> bool:
    """Whether the dead letter belongs to ``table``: recorded for it, or an event of it routes there."""
    if letter.table is not None:
        return letter.table == table
    for item in _items(letter):
        try:
            event_type = orjson.loads(item).get("type")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if (
            isinstance(event_type, str)
            and event_type
            and str(router.table_for(event_type)) == table
        ):
            return True
    return False


# --- replay ---------------------------------------------------------------------------------------


def origin_key(letter: StoredDeadLetter) -> str:
    """Where the replay of this input is remembered: a digest of its batch, position and bytes."""
    digest = hashlib.sha256(f"{letter.batch_id}\0{letter.position}\0".encode())
    digest.update(letter.raw)
    return keys.replayed(digest.hexdigest()[:32])


@dataclass
class ReplayReport:
    batches: list[str] = field(default_factory=list)
    events: int = 0
    still_invalid: int = 0
    removed: int = 0
    duplicates: int = 0


class Replayer:
    """Replays dead letters through a producer, exactly once (see the module docstring)."""

    def __init__(self, settings: Settings, client: redis.Redis, producer: Any = None) -> None:
        self.settings = settings
        self.client = client
        self.store = DeadLetterStore(client)
        self._assign = client.register_script(_ASSIGN_LUA)
        self._producer = producer

    def replay(self, letters: list[StoredDeadLetter]) -> ReplayReport:
        report = ReplayReport()
        for batch_id in self.assign(letters, report):
            self._send(batch_id, report)
        return report

    def assign(self, letters: list[StoredDeadLetter], report: ReplayReport) -> list[str]:
        """The replay batches of ``letters``, assigning those that have none yet."""
        ids = [letter.id for letter in letters]
        current = self.client.hmget(REPLAYS_KEY, ids) if ids else []
        batches = dict.fromkeys(_text(b) for b in current if b is not None)
        fresh = self._originals(
            [letter for letter, b in zip(letters, current, strict=True) if b is None], report
        )
        by_table: dict[str | None, list[StoredDeadLetter]] = {}
        for letter in fresh:
            by_table.setdefault(letter.table, []).append(letter)
        for table, group in by_table.items():
            for start in range(0, len(group), REPLAY_BATCH_LETTERS):
                members = [letter.id for letter in group[start : start + REPLAY_BATCH_LETTERS]]
                digest = hashlib.sha256("\n".join(members).encode()).hexdigest()[:24]
                batch_id = f"replay-{digest}"
                info = orjson.dumps({"members": members, "table": table}).decode()
                if not self._assign(keys=[REPLAYS_KEY], args=[batch_id, info, *members]):
                    # a concurrent replay took some of them: follow its assignments
                    for taken in self.client.hmget(REPLAYS_KEY, members):
                        if taken is not None:
                            batches[_text(taken)] = None
                    continue
                batches[batch_id] = None
        return list(batches)

    def _originals(
        self, letters: list[StoredDeadLetter], report: ReplayReport
    ) -> list[StoredDeadLetter]:
        """Claim the origin of each letter; delete those whose origin another letter claimed."""
        ttl_s = self.settings.dedup_window_s
        pipe = self.client.pipeline(transaction=False)
        for letter in letters:
            pipe.set(origin_key(letter), letter.id, nx=True, ex=ttl_s)
            pipe.get(origin_key(letter))
        replies = pipe.execute()
        originals: list[StoredDeadLetter] = []
        twins: list[StoredDeadLetter] = []
        for n, letter in enumerate(letters):
            owner = replies[2 * n + 1]
            (originals if owner is None or _text(owner) == letter.id else twins).append(letter)
        if twins:
            report.duplicates += self.store.delete(letter.id for letter in twins)
        return originals

    def _send(self, batch_id: str, report: ReplayReport) -> None:
        info_json = self.client.hget(REPLAYS_KEY, f"batch:{batch_id}")
        if info_json is None:
            return
        info = orjson.loads(info_json)
        members: list[str] = info["members"]
        table: str | None = info["table"]
        letters, _gone = fetch(self.client, members)
        events: list[str] = []
        invalid: list[tuple[StoredDeadLetter, DeadLetter]] = []
        for letter in letters:
            items = _items(letter)
            for position, item in enumerate(items):
                parsed = parse_batch(
                    item, batch_id=letter.batch_id, max_event_bytes=self.settings.max_event_bytes
                )
                events.extend(event.raw for event in parsed.events)
                at = letter.position if len(items) == 1 else position
                invalid.extend(
                    (letter, DeadLetter(bad.batch_id, at, bad.reason, bad.attribute, bad.raw))
                    for bad in parsed.dead_letters
                )
        if events:
            self._enqueue(events, table, batch_id)
            report.batches.append(batch_id)
            report.events += len(events)
        # The invalid ones go back, the replayed ones go: one transaction, then the assignment.
        pipe = self.client.pipeline(transaction=True)
        now_ms = int(time.time() * 1000)
        for letter, bad in invalid:
            reason = f"{bad.reason} (replayed dead letter {letter.id}: {letter.reason})"[:4000]
            pipe.xadd(
                self.store.key,
                _fields(bad, reason, letter.table, now_ms),
                maxlen=self.store.maxlen,
                approximate=True,
            )
        if letters:
            pipe.xdel(self.store.key, *[letter.id for letter in letters])
        for letter in {letter.id: letter for letter, _ in invalid}.values():
            pipe.delete(origin_key(letter))  # back in the stream: replayable again later
        pipe.execute()
        self.client.hdel(REPLAYS_KEY, *members, f"batch:{batch_id}")
        report.still_invalid += len(invalid)
        report.removed += len(letters)

    def _enqueue(self, events: list[str], table: str | None, batch_id: str) -> None:
        if self._producer is not None:
            self._producer.enqueue(events, table=table, batch_id=batch_id)
            return
        from common.ingest.producer import Producer

        with Producer(self.settings, client=self.client) as producer:
            producer.enqueue(events, table=table, batch_id=batch_id)


def _fields(
    letter: DeadLetter, reason: str, table: str | None, at_ms: int
) -> dict[FieldT, EncodableT]:
    """The stream entry layout of common/coord/deadletters.py (absent field = None)."""
    fields: dict[FieldT, EncodableT] = {
        "batch_id": letter.batch_id,
        "position": letter.position,
        "reason": reason,
        "raw": letter.raw,
        "at_ms": at_ms,
    }
    if letter.attribute is not None:
        fields["attribute"] = letter.attribute
    if table is not None:
        fields["table"] = table
    return fields


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
            letters, missing = fetch(client, list(ids))
            for entry_id in missing:
                console.print(f"[yellow]no dead letter {escape(entry_id)}[/]")
        else:
            letters = list(all_letters(DeadLetterStore(client)))
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


__all__ = ["REPLAYS_KEY", "Replayer", "dead_letters", "letter_json", "preview", "routes_to"]
