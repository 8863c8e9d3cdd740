"""The writer's side of exactly once per CloudEvent: which events of a batch to write.

The protocol is in :mod:`common.coord.claims`; these are the steps :class:`~common.write.
batch_writer.BatchWriter` takes with it: claim the events it is about to write (tables with
dedupe on, where the batch is not registered yet), dead-letter the conflicting repeats among the
events it handles, and give back the claims of events a table rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.coord.claims import (
    CONFLICT,
    EventClaims,
    EventRow,
    Verdicts,
    claim_batch,
    release_events,
)
from common.ingest.events import DeadLetter, Event
from common.ingest.routing import TableName
from common.settings import Settings
from common.write.sources import CompiledSource


def claim_events(
    claims: EventClaims | None,
    settings: Settings,
    batch_id: str,
    events: Sequence[Event],
    tables: Sequence[TableName],
    known: Mapping[TableName, bool],
) -> Verdicts:
    """Claim the identities of ``events`` (as many as ``tables`` routes) that will be written."""
    on = {name: not is_known and settings.dedupe_for(str(name)) for name, is_known in known.items()}
    if claims is None or not any(on.values()):
        return Verdicts()
    rows: dict[str, list[EventRow]] = {}
    for name in (name for name, yes in on.items() if yes):
        # one comprehension per table (a batch has one to a few): the cheapest loop Python has
        rows[str(name)] = [
            (index, event.attributes["source"], event.attributes["id"], event.raw)
            for index, (event, routed) in enumerate(zip(events, tables, strict=False))
            if routed == name
        ]
    return claim_batch(claims, batch_id, rows, settings.dedup_window_s)


def claim_compiled(
    claims: EventClaims | None,
    settings: Settings,
    batch_id: str,
    name: TableName,
    source: CompiledSource,
    limit: int,
) -> Verdicts:
    """Claim the rows ``[0, limit)`` of a batch the compiled path read (one table, every event
    valid, so a row's index is its event's)."""
    if claims is None or not settings.dedupe_for(str(name)) or not limit:
        return Verdicts()
    rows = source.rows.rows.slice(0, limit)
    columns = zip(
        rows.column("source").to_pylist(),
        rows.column("id").to_pylist(),
        rows.column("raw_event").to_pylist(),
        strict=True,
    )
    table_rows = [(index, src, event_id, raw) for index, (src, event_id, raw) in enumerate(columns)]
    return claim_batch(claims, batch_id, {str(name): table_rows}, settings.dedup_window_s)


def conflicts(
    batch_id: str, events: Sequence[Event], verdicts: Verdicts, upto: int
) -> list[DeadLetter]:
    """Dead letters for the repeats with other bytes among the events before ``upto`` (the
    batch's split point: the child judges the rest)."""
    letters = []
    for index, table, code in verdicts.repeats:
        if code != CONFLICT or index >= upto:
            continue
        event = events[index]
        attributes = event.attributes
        reason = (
            f"id: duplicate with other content: source {attributes['source'][:200]!r}, id "
            f"{attributes['id'][:200]!r} already landed or is pending in {table} with other "
            "bytes (two events under one identity; see docs/exactly-once.md)"
        )
        letters.append(DeadLetter(batch_id, event.position, reason, "id", event.raw.encode()))
    return letters


def release_rejected(
    claims: EventClaims | None,
    settings: Settings,
    batch_id: str,
    events: Sequence[Event],
    rejected: Sequence[tuple[str, int]],
) -> int:
    """Give back the claims of events a table rejected ((table, payload position)): they are in
    the dead letters, and a replay of them must land."""
    if claims is None or not rejected:
        return 0
    index_of = {event.position: index for index, event in enumerate(events)}
    rows: dict[str, list[EventRow]] = {}
    for name, position in rejected:
        index = index_of[position]
        attributes = events[index].attributes
        rows.setdefault(name, []).append(
            (index, attributes["source"], attributes["id"], events[index].raw)
        )
    return release_events(claims, batch_id, rows, settings.dedup_window_s)
