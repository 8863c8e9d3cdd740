"""Bounded tables (common/write/table_limits.py): a cap on the tables writers create, and types
no rule matches sent to the dead letters or to one table, each refusal with its reason. The
writer as a worker runs it, on the embedded SQLite catalog."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from common.ingest.routing import Router
from common.lake.catalog import TableStore, open_catalog
from common.settings import load_settings
from common.write.batch_writer import BatchWriter
from common.write.table_limits import count_tables

pytestmark = pytest.mark.unit


def make_writer(home: Path, **env: str) -> tuple[BatchWriter, Any]:
    settings = load_settings(env, home=home)
    catalog = open_catalog(settings)
    store = TableStore(catalog, lambda _table: contextlib.nullcontext())
    router = Router(settings.routes, settings.namespace, settings.unrouted)
    return BatchWriter(settings, store, router), catalog


def payload(*types: str) -> str:
    return "\n".join(
        json.dumps(
            {
                "specversion": "1.0",
                "id": f"e-{n}",
                "source": "/t",
                "type": event_type,
                "time": "2024-05-01T12:00:00Z",
                "data": {"n": n},
            }
        )
        for n, event_type in enumerate(types)
    )


def test_no_table_is_created_past_the_cap_and_the_events_say_why(tmp_path: Path) -> None:
    # Given writers capped at two tables, and a batch of three types
    writer, catalog = make_writer(tmp_path, ICEFLEET_MAX_TABLES="2")
    result = writer.write("b1", payload("com.x.a", "com.x.b", "com.x.c", "com.x.a"))

    # Then two tables exist, the third type's event is a dead letter naming the cap and the fix
    assert count_tables(catalog) == 2
    assert sorted(result.files) == ["events.a", "events.b"]
    (letter,) = result.dead_letters
    assert letter.position == 2 and json.loads(letter.raw)["type"] == "com.x.c"
    assert "ICEFLEET_MAX_TABLES=2" in letter.reason and "ICEFLEET_UNROUTED" in letter.reason

    # And existing tables keep taking events at the cap
    again = writer.write("b2", payload("com.x.b"))
    assert sorted(again.files) == ["events.b"] and again.dead_letters == []


def test_unrouted_types_go_to_the_dead_letters_when_asked(tmp_path: Path) -> None:
    # Given a rule for one type and ICEFLEET_UNROUTED=dead-letter
    writer, catalog = make_writer(
        tmp_path, ICEFLEET_ROUTES="com.shop.*=shop.orders", ICEFLEET_UNROUTED="dead-letter"
    )

    # When a batch carries that type and an invented one
    result = writer.write("b1", payload("com.shop.order", "made.up.by.a.client"))

    # Then only the routed one has a table; the other is a dead letter with the reason
    assert sorted(result.files) == ["shop.orders"]
    assert count_tables(catalog) == 1
    (letter,) = result.dead_letters
    assert "matches no ICEFLEET_ROUTES rule" in letter.reason and letter.position == 1


def test_unrouted_types_can_share_one_table(tmp_path: Path) -> None:
    writer, catalog = make_writer(tmp_path, ICEFLEET_UNROUTED="events.other")
    result = writer.write("b1", payload("a.one", "b.two", "c.three"))
    assert sorted(result.files) == ["events.other"] and result.records == 3
    assert count_tables(catalog) == 1


def test_the_unrouted_setting_says_what_it_accepts() -> None:
    with pytest.raises(ConfigError, match=r"by-type, dead-letter, or one namespace\.table"):
        load_settings({"ICEFLEET_UNROUTED": "drop"})
    assert load_settings({}).unrouted == "by-type"
