"""Hostile input: valid events built to hurt land safely, inside the warehouse; invalid ones are
dead-lettered with a reason.

Valid but hostile: types that look like paths or SQL, ids and sources of 100 KB, data nested 100
levels deep and 1,200 keys wide, NUL and bidi characters in values and keys, keys that clash with
each other or with envelope columns (``a``/``A``, ``id``, ``""``, ``a.b``). Each lands once with
its id and its ``raw_event`` byte for byte; every file written is under its table's location in
the warehouse, and the catalog still answers. Invalid items (no id, bad time, lone surrogate,
invalid UTF-8, too large, nested too deep...) are dead-lettered once each, with a reason naming
what is wrong. Written here by the writer as a worker does, then through the producer and real
workers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.ingest.producer import Producer
from common.settings import load_settings
from tests.support.fleet import environment, fleet_env, running_fleet, wait_idle
from tests.support.hostile import INVALID, hostile_events, line, payload
from tests.support.readback import assert_exactly_once
from tests.support.stack import Stack, make_stack

pytestmark = pytest.mark.integration

SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SAFE_FILE = re.compile(r"^[A-Za-z0-9_=.-]+$")


def check_landed(stack: Stack, home: Path) -> None:
    """Every valid event once, byte for byte, in tables with safe names, files in the warehouse."""
    events = hostile_events()
    expected_raw = {e["id"]: line(e) for e in events}
    namespaces = stack.catalog.list_namespaces()
    assert namespaces == [("events",)]
    tables = stack.catalog.list_tables("events")
    assert all(SAFE_NAME.match(name) for _, name in tables), tables
    found: dict[str, str] = {}
    warehouse = (home / "warehouse").resolve()
    for identifier in tables:
        table = stack.catalog.load_table(identifier)
        location = table.location().rstrip("/") + "/"
        for task in table.scan().plan_files():
            path = task.file.file_path
            assert path.startswith(location), (path, location)
            local = Path(path.removeprefix("file://")).resolve()
            assert local.is_relative_to(warehouse) and local.is_file(), local
            assert SAFE_FILE.match(local.name), local.name
        rows = table.scan(selected_fields=("id", "raw_event")).to_arrow().to_pylist()
        for row in rows:
            assert row["id"] not in found, f"{row['id'][:40]!r} twice"
            found[row["id"]] = row["raw_event"]
    assert_exactly_once(list(found), list(expected_raw), "hostile events")
    assert found == expected_raw  # ids and raw events come back byte for byte
    # nothing was written outside the warehouse, the catalog and Redis files
    for root, _dirs, files in os.walk(home):
        for name in files:
            path = Path(root, name).resolve()
            assert (
                path.is_relative_to(warehouse)
                or path.name.startswith("catalog.db")
                or (
                    path.is_relative_to(home.resolve() / "logs")
                    or path.is_relative_to(home.resolve() / "redis")
                    or path.name.startswith("celerybeat-schedule")
                )
            ), path
    tables_dir = warehouse / "events"
    for pattern in ("*passwd*", "*shadow*", "*outside*", "*System32*", "*escape*"):
        for path in home.parent.rglob(pattern):
            assert path.resolve().is_relative_to(tables_dir), path


def check_dead_letters(letters: list[Any], batch_ids: set[str]) -> None:
    """Each invalid item dead-lettered once, with its reason; no valid event among them."""
    by_raw = {d.raw: d for d in letters if d.batch_id in batch_ids}
    assert len(by_raw) == len([d for d in letters if d.batch_id in batch_ids]), "twice"
    for raw, reason in INVALID:
        letter = by_raw.get(raw)
        assert letter is not None, f"not dead-lettered: {raw[:60]!r}"
        assert letter.reason.startswith(reason), (reason, letter.reason)
    assert len(by_raw) == len(INVALID)


@pytest.fixture
def stack(redis_client: redis.Redis, redis_url: str, icefleet_home: Path) -> Iterator[Stack]:
    built = make_stack(redis_url, icefleet_home)
    yield built
    built.close()


def test_hostile_events_land_inside_the_warehouse_and_invalid_ones_are_dead_lettered(
    stack: Stack, icefleet_home: Path
) -> None:
    # Given one payload of hostile valid events and invalid items, as a writer receives it
    # When it is written and committed
    result = stack.writer.write("hostile/../batch'; --", payload(), enqueued_at_ms=0)
    stack.commit_all()

    # Then each valid event landed once, byte for byte, and nothing left the warehouse
    assert result.events == len(hostile_events())
    check_landed(stack, icefleet_home)
    # ... and each invalid item is a dead letter with the reason
    check_dead_letters(stack.dead, {"hostile/../batch'; --"})
    assert stack.catalog.table_exists(("events", "passwd"))  # the path became a plain name


def test_hostile_events_through_the_producer_and_real_workers(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.coord.deadletters import DeadLetterStore

    # Given a fleet, and the hostile events sent through the producer, with the invalid items
    # the producer lets through (valid JSON text on one line)
    home = tmp_path / "home"
    env = fleet_env(ICEFLEET_REDIS_URL=redis_url, ICEFLEET_HOME=str(home))
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
    with environment(env):
        settings = load_settings()
    lines: list[Any] = [*hostile_events()]
    sendable = [(raw, reason) for raw, reason in INVALID if _one_utf8_line(raw)]
    lines += [raw.decode() for raw, _ in sendable]
    with environment(env), running_fleet(settings, writers=1):
        with Producer(settings) as producer:
            batch_ids = producer.enqueue_many(lines, batch_id="hostile'; DROP TABLE x; --/..")
        wait_idle(redis_client, timeout_s=120)

    # Then the same holds through Celery and the workers
    stack = make_stack(redis_url, home)
    try:
        check_landed(stack, home)
    finally:
        stack.close()
    letters = DeadLetterStore(redis_client).list(100)
    got = {d.raw: d.reason for d in letters if d.batch_id in set(batch_ids)}
    assert len(got) == len(sendable)
    for raw, reason in sendable:
        assert got[raw].startswith(reason), (raw[:60], got.get(raw))


def _one_utf8_line(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\n" not in text and len(raw) < 1_000_000
