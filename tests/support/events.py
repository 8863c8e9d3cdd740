"""Synthetic CloudEvents whose ``id`` says which batch they belong to (``<batch id>-<n>``), so
reading a table back tells which batches landed and how often."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from common.ingest.routing import Router
from common.settings import Settings

EVENT_TYPE = "com.example.order"
BASE_TIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_events(
    prefix: str,
    count: int,
    *,
    types: Sequence[str] = (EVENT_TYPE,),
    days: int = 1,
    day_offset: int = 0,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """``count`` CloudEvents with ids ``<prefix>-<n>``, cycling through ``types`` and through
    ``days`` days from ``day_offset``; ``extra`` adds ``data`` fields."""
    return [
        {
            "specversion": "1.0",
            "id": event_id(prefix, n),
            "source": "/tests",
            "type": types[n % len(types)],
            "time": (BASE_TIME + timedelta(days=day_offset + n % days, seconds=n))
            .isoformat()
            .replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": {"order": n, "amount": 1.5 * n, "batch": prefix, **(extra or {})},
        }
        for n in range(count)
    ]


def event_id(prefix: str, n: int) -> str:
    return f"{prefix}-{n}"


def ids_of(events: Iterable[dict[str, Any]]) -> list[str]:
    return [str(e["id"]) for e in events]


def ndjson(events: Iterable[dict[str, Any]]) -> str:
    """One JSON document per line, each line ended by a newline (as the producer sends)."""
    return "".join(orjson.dumps(e).decode() + "\n" for e in events)


def expected_by_table(settings: Settings, events: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """The ids each table should hold once ``events`` have landed, routed as ``settings`` say."""
    router = Router(settings.routes, settings.namespace)
    out: dict[str, list[str]] = {}
    for event in events:
        out.setdefault(str(router.table_for(event["type"])), []).append(event["id"])
    return out
