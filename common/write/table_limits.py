"""Bounded tables: no client with the token can make the writers create tables without limit.

Two guards, both turning events into dead letters with a reason instead of a table:

- ``ICEFLEET_UNROUTED=dead-letter`` routes the types no ``ICEFLEET_ROUTES`` rule matches to
  :data:`~common.ingest.routing.DEAD_LETTER_ROUTE` (or ``=namespace.table`` to one table, which
  needs no guard here);
- ``ICEFLEET_MAX_TABLES`` caps the tables in the catalog: a new table past it is not created.
  Counted only when a table is about to be created (the catalog is listed then, not per batch),
  so a few writers racing at the cap may pass it by one table each.
"""

from __future__ import annotations

from pyiceberg.catalog import Catalog

from common.ingest.events import DeadLetter, Event
from common.ingest.routing import DEAD_LETTER_ROUTE, TableName
from common.settings import Settings


def count_tables(catalog: Catalog) -> int:
    """Tables in the catalog (one level of namespaces, as icefleet creates them)."""
    return sum(len(catalog.list_tables(namespace)) for namespace in catalog.list_namespaces())


def unrouted_reason(name: TableName, events: list[Event]) -> str | None:
    """Why events routed to ``name`` are dead-lettered for want of a route, if they are."""
    if name != DEAD_LETTER_ROUTE:
        return None
    return (
        f"type {events[0].attributes['type'][:200]!r} matches no ICEFLEET_ROUTES rule and "
        "ICEFLEET_UNROUTED=dead-letter: add a rule for it, or set ICEFLEET_UNROUTED"
    )


def cap_reason(name: TableName, catalog: Catalog, max_tables: int) -> str | None:
    """Why the new table ``name`` may not be created, if the catalog is at its cap."""
    count = count_tables(catalog)
    if count < max_tables:
        return None
    return (
        f"table {name} not created: the catalog holds {count} tables, the cap "
        f"ICEFLEET_MAX_TABLES={max_tables}; raise it, or route such types to an existing table "
        "(ICEFLEET_ROUTES, ICEFLEET_UNROUTED)"
    )


def refusal(
    name: TableName, events: list[Event], exists: bool, catalog: Catalog, settings: Settings
) -> str | None:
    """Why the events routed to ``name`` become dead letters instead (``None``: they do not)."""
    if (reason := unrouted_reason(name, events)) is not None:
        return reason
    return None if exists else cap_reason(name, catalog, settings.max_tables)


def refused(batch_id: str, events: list[Event], reason: str) -> list[DeadLetter]:
    """The events as dead letters, each as received, with ``reason``."""
    return [
        DeadLetter(
            batch_id, event.position, reason, "type", event.raw.encode("utf-8", "surrogatepass")
        )
        for event in events
    ]
