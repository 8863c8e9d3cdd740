"""The hostile-input corpus: valid events built to hurt, and invalid items with their reasons.

Used by tests/integration/test_hostile_input.py (through the real pipeline) and
tests/unit/test_compiled_equivalence.py (the compiled and the reference parse paths must agree).
"""

from __future__ import annotations

from typing import Any

import orjson

from common.ingest.events import encode_ndjson

BIDI = "\u202e\u2066\u2069\u200f"  # right-to-left override, isolates, RLM
HUGE = 100_000


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
