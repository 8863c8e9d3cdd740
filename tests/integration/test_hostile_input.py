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

import orjson
import pytest
import redis

from common.ingest.events import encode_ndjson
from common.ingest.producer import Producer
from common.settings import load_settings
from tests.support.fleet import environment, fleet_env, running_fleet, wait_idle
from tests.support.readback import assert_exactly_once
from tests.support.stack import Stack, make_stack

pytestmark = pytest.mark.integration

BIDI = "\u202e\u2066\u2069\u200f"  # right-to-left override, isolates, RLM
HUGE = 100_000
SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SAFE_FILE = re.compile(r"^[A-Za-z0-9_=.-]+$")


def ce(event_id: str, event_type: str, data: Any = None, **attrs: Any) -> dict[str, Any]:
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/hostile",
        "type": event_type,
        "time": "2024-05-01T12:00:00Z",
        **attrs,
    }
    if data is not None:
        event["data"] = data
    return event


def deep(levels: int) -> Any:
    value: Any = {"leaf": "bottom"}
    for n in range(levels):
        value = {f"l{n}": value}
    return value


def hostile_events() -> list[dict[str, Any]]:
    return [
        # types that look like paths
        ce("path-1", "../../../../etc/passwd", {"x": 1}),
        ce("path-2", "/etc/shadow", {"x": 2}),
        ce("path-3", "com.example/../../../outside", {"x": 3}),
        ce("path-4", "..", {"x": 4}),
        ce("path-5", "C:\\Windows\\System32\\drivers", {"x": 5}),
        ce("path-6", "com.example.%2e%2e%2fescape", {"x": 6}),
        ce("path-7", "com.example.\u0000nul\u202etype", {"x": 7}),
        # types and values that look like SQL
        ce("sql-1", "x'; DROP TABLE iceberg_tables; --", {"q": "' OR 1=1 --"}),
        ce("sql-2", 'events.order"; DELETE FROM iceberg_namespace_properties; --', {"x": 1}),
        ce("sql-3", "com.example.order", {"name": "Robert'); DROP TABLE students;--"}),
        # huge id and source
        ce("H" * HUGE, "com.example.huge", {"x": 1}, source="/" + "s" * HUGE),
        # deep and wide data
        ce("deep-1", "com.example.deep", deep(100)),
        ce("wide-1", "com.example.wide", {f"k{n}": n for n in range(1_200)}),
        # NUL and bidi characters in strings and keys, and in the envelope
        ce(
            f"nul\u0000id{BIDI}",
            "com.example.text",
            {"na\u0000me": "v\u0000al", f"{BIDI}key": f"a{BIDI}b", "emoji": "🧊\U0001f525"},
            subject=f"sub\u0000ject{BIDI}",
            source=f"/src\u0000{BIDI}",
            ext="x\u0000y",
        ),
        ce("crlf-1", "com.example.text", {"line": "a\r\nb\nc\rd"}, subject="s\r\n"),
        # keys that clash
        ce("clash-1", "com.example.clash", {"a": 1, "A": 2, "id": "inner", "": "empty", "a.b": 3}),
        ce("clash-2", "com.example.clash", {"time": "not a time", "type": 5, "raw_event": "x"}),
        ce("clash-3", "com.example.clash", {"_rescued_data": "{}", "_batch_id": "fake"}),
        ce("clash-4", "com.example.clash", {"Id": 1, "ID": 2, "iD": {"x": 1}}),
        # odd but valid attribute values
        ce("odd-1", "com.example.odd", [1, "two", None], dataschema="file:///etc/passwd"),
        ce("odd-2", "com.example.odd", "just a string", datacontenttype="text/plain"),
        ce("odd-3", "com.example.odd", data_base64="aGVsbG8="),
        ce("odd-4", "com.example.odd", {"big": 2**70, "neg": -(2**63), "f": 1e308}),
    ]


# Invalid items: (raw line, start of the reason it must be dead-lettered with).
INVALID: list[tuple[bytes, str]] = [
    (orjson.dumps({k: v for k, v in ce("x", "t").items() if k != "id"}), "id: required"),
    (orjson.dumps(ce("", "t")), "id: must be a non-empty string"),
    (orjson.dumps({**ce("x", "t"), "id": 5}), "id: must be a non-empty string"),
    (orjson.dumps({**ce("x", "t"), "specversion": "0.3"}), "specversion: unsupported"),
    (orjson.dumps(ce("x", "")), "type: must be a non-empty string"),
    (orjson.dumps({**ce("x", "t"), "time": "yesterday"}), "time: not an RFC 3339"),
    (orjson.dumps({**ce("x", "t"), "Bad-Ext": "v"}), "Bad-Ext: extension attribute names"),
    (orjson.dumps({**ce("x", "t"), "ext": {"o": 1}}), "ext: extension values"),
    (orjson.dumps({**ce("x", "t"), "ext": 2**40}), "ext: integer"),
    (orjson.dumps(ce("x", "t", {"a": 1}, data_base64="aGk=")), "data_base64: not allowed"),
    (orjson.dumps(ce("x", "t", data_base64="%%%")), "data_base64: not valid base64"),
    (b'{"specversion":"1.0","id":"\\ud800","source":"/s","type":"t"}', "id: holds a lone"),
    (
        b'{"specversion":"1.0","id":"x","source":"/s","type":"t","data":'
        + b"[" * 200
        + b"]" * 200
        + b"}",
        "data: nested deeper",
    ),
    (b"\xff\xfe{not utf-8}", "not valid UTF-8"),
    (b"{{{ not json", "not valid JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"specversion":"1.0","id":"x","source":"/s","type":"t","data":NaN}', "not valid JSON"),
    (orjson.dumps(ce("big", "t", {"blob": "z" * 1_100_000})), "event is "),
]


def line(event: dict[str, Any]) -> str:
    """The event as one NDJSON line, as the producer encodes it (integers beyond 64 bits too)."""
    return encode_ndjson([event])[:-1]


def payload() -> bytes:
    valid = [line(e).encode() for e in hostile_events()]
    return b"\n".join(valid + [raw for raw, _ in INVALID]) + b"\n"


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
