"""CloudEvents parsing and validation: formats, rules, dead letters, round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import ConfigError, InvalidEventError
from common.ingest.events import (
    MAX_NESTING_DEPTH,
    DeadLetter,
    encode_ndjson,
    parse_batch,
    parse_rfc3339,
    split_events,
    validate_event,
)

pytestmark = pytest.mark.unit

GITHUB_WEBHOOKS = Path(__file__).resolve().parents[3] / "shared/data/github-webhooks.ndjson"
DROP = object()  # marks an attribute to leave out of an event


def event(**changes: Any) -> dict[str, Any]:
    """A valid event, with attributes changed (or dropped with DROP)."""
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "https://example.com/src",
        "type": "com.example.thing.created",
        "time": "2023-05-14T02:09:32Z",
        "data": {"n": 1},
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not DROP}


def encoded(**changes: Any) -> bytes:
    return json.dumps(event(**changes), separators=(",", ":"), ensure_ascii=False).encode()


VALID = encoded()
HEAD = b'{"specversion":"1.0","id":"x","source":"s","type":"t"'  # a valid event, still open


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- the corpus of invalid single events --------------------------------------------------------

INVALID: list[tuple[str, bytes, str, str | None]] = [
    # (case, payload, reason substring, attribute)
    ("malformed-json", HEAD + b',"data":', "not valid JSON", None),
    ("truncated", b'{"specversion":"1.0","id":"x"', "not valid JSON", None),
    ("trailing-comma", HEAD + b",}", "not valid JSON", None),
    ("single-quotes", b"{'specversion':'1.0'}", "not valid JSON", None),
    ("not-json-at-all", b"hello world", "not valid JSON", None),
    ("bad-utf8", HEAD + b',"data":"\xff\xfe"}', "not valid UTF-8", None),
    ("utf8-encoded-surrogate", HEAD + b',"data":"\xed\xa0\x80"}', "not valid UTF-8", None),
    ("lone-surrogate-id", encoded(id=DROP)[:-1] + b',"id":"\\ud800"}', "id: holds a lone", "id"),
    ("lone-surrogate-data", HEAD + b',"data":{"k":["\\udfff"]}}', "data: holds a lone", "data"),
    ("nan", HEAD + b',"data":NaN}', "NaN is not a finite JSON number", None),
    ("infinity", HEAD + b',"data":[-Infinity]}', "Infinity is not a finite JSON number", None),
    ("number-overflow", HEAD + b',"data":1e400}', "1e400 is not a finite JSON number", None),
    ("over-size", HEAD + b',"data":"' + b"x" * 1_048_576 + b'"}', "ICEFLEET_MAX_EVENT_BYTES", None),
    ("string-not-object", b'"just a string"', "not a JSON object: got 'just a string'", None),
    ("number-not-object", b"42", "not a JSON object: got 42", None),
    ("null-not-object", b"null", "not a JSON object: got null", None),
    (
        "deep-nesting-recursion",
        HEAD + b',"data":' + nested(100_000) + b"}",
        "nested too deep",
        None,
    ),
    (
        "deep-nesting-limit",
        HEAD + b',"data":' + nested(MAX_NESTING_DEPTH) + b"}",
        "data: nested",
        "data",
    ),
    (
        "specversion-missing",
        encoded(specversion=DROP),
        "specversion: required attribute is missing",
        "specversion",
    ),
    (
        "specversion-0.3",
        encoded(specversion="0.3"),
        "specversion: unsupported version '0.3'",
        "specversion",
    ),
    (
        "specversion-number",
        HEAD.replace(b'"1.0"', b"1.0") + b"}",
        "specversion: must be the string '1.0', got 1.0",
        "specversion",
    ),
    (
        "specversion-null",
        encoded(specversion=None),
        "specversion: must be the string '1.0', got null",
        "specversion",
    ),
    (
        "specversion-padded",
        encoded(specversion="1.0 "),
        "specversion: unsupported version",
        "specversion",
    ),
    ("id-missing", encoded(id=DROP), "id: required attribute is missing", "id"),
    ("id-huge-int", encoded(id=10**30), "id: must be a non-empty string, got 1" + "0" * 30, "id"),
    ("huge-int-in-data-no-id", encoded(id=DROP, data=[2**80]), "id: required attribute", "id"),
    ("ext-huge-int", encoded(seq=-(10**25)), "seq: integer -1" + "0" * 25 + " is outside", "seq"),
    ("id-empty", encoded(id=""), "id: must be a non-empty string, got ''", "id"),
    ("id-int", encoded(id=42), "id: must be a non-empty string, got 42", "id"),
    ("id-null", encoded(id=None), "id: must be a non-empty string, got null", "id"),
    ("source-missing", encoded(source=DROP), "source: required attribute is missing", "source"),
    ("source-empty", encoded(source=""), "source: must be a non-empty string", "source"),
    (
        "type-object",
        encoded(type={"a": 1}),
        "type: must be a non-empty string, got an object",
        "type",
    ),
    ("type-missing", encoded(type=DROP), "type: required attribute is missing", "type"),
    ("subject-empty", encoded(subject=""), "subject: must be a non-empty string", "subject"),
    ("subject-int", encoded(subject=7), "subject: must be a non-empty string, got 7", "subject"),
    (
        "datacontenttype-empty",
        encoded(datacontenttype=""),
        "datacontenttype: must be a non-empty",
        "datacontenttype",
    ),
    (
        "dataschema-array",
        encoded(dataschema=["x"]),
        "dataschema: must be a non-empty string, got an array",
        "dataschema",
    ),
    (
        "time-date-only",
        encoded(time="2023-05-14"),
        "time: not an RFC 3339 timestamp: '2023-05-14'",
        "time",
    ),
    (
        "time-month-13",
        encoded(time="2023-13-01T00:00:00Z"),
        "time: not an RFC 3339 timestamp",
        "time",
    ),
    ("time-february-30", encoded(time="2023-02-30T00:00:00Z"), "day is out of range", "time"),
    (
        "time-no-offset",
        encoded(time="2023-05-14T02:09:32"),
        "time: not an RFC 3339 timestamp",
        "time",
    ),
    ("time-space", encoded(time="2023-05-14 02:09:32Z"), "time: not an RFC 3339 timestamp", "time"),
    (
        "time-hour-25",
        encoded(time="2023-05-14T25:00:00Z"),
        "time: not an RFC 3339 timestamp",
        "time",
    ),
    ("time-offset-24h", encoded(time="2023-05-14T02:09:32+24:00"), "time: not an RFC 3339", "time"),
    (
        "time-short-offset",
        encoded(time="2023-05-14T02:09:32+0200"),
        "time: not an RFC 3339",
        "time",
    ),
    ("time-empty-fraction", encoded(time="2023-05-14T02:09:32.Z"), "time: not an RFC 3339", "time"),
    (
        "time-unicode-digits",
        encoded(time="\uff12023-05-14T02:09:32Z"),
        "time: not an RFC 3339",
        "time",
    ),
    (
        "time-number",
        encoded(time=1684030172),
        "time: must be an RFC 3339 timestamp string, got 1684030172",
        "time",
    ),
    ("time-overflow", encoded(time="0001-01-01T00:00:00+01:00"), "time: not an RFC 3339", "time"),
    (
        "data-and-base64",
        encoded(data_base64="aGk="),
        "data_base64: not allowed together with data",
        "data_base64",
    ),
    (
        "base64-bad-chars",
        encoded(data=DROP, data_base64="not base64!"),
        "data_base64: not valid base64",
        "data_base64",
    ),
    (
        "base64-bad-padding",
        encoded(data=DROP, data_base64="abc"),
        "data_base64: not valid base64",
        "data_base64",
    ),
    (
        "base64-non-ascii",
        encoded(data=DROP, data_base64="é"),
        "data_base64: not valid base64",
        "data_base64",
    ),
    (
        "base64-int",
        encoded(data=DROP, data_base64=12),
        "data_base64: must be a base64 string",
        "data_base64",
    ),
    ("ext-uppercase", encoded(Region="eu"), "Region: extension attribute names", "Region"),
    (
        "ext-too-long",
        encoded(**{"a" * 21: "x"}),
        "a" * 21 + ": extension attribute names",
        "a" * 21,
    ),
    ("ext-dash", encoded(**{"my-ext": "x"}), "my-ext: extension attribute names", "my-ext"),
    ("ext-underscore", encoded(my_ext="x"), "my_ext: extension attribute names", "my_ext"),
    ("ext-empty-name", encoded(**{"": "x"}), "'': extension attribute names", "''"),
    ("ext-non-ascii", encoded(café="x"), "café: extension attribute names", "café"),
    (
        "ext-float",
        encoded(ratio=1.5),
        "ratio: extension values must be string, integer or boolean: 1.5",
        "ratio",
    ),
    (
        "ext-object",
        encoded(meta={"a": 1}),
        "meta: extension values must be string, integer or boolean: an object",
        "meta",
    ),
    ("ext-array", encoded(tags=["a"]), "tags: extension values must be", "tags"),
    (
        "ext-int-over-32-bits",
        encoded(seq=2**31),
        "seq: integer 2147483648 is outside the 32-bit",
        "seq",
    ),
]


@pytest.mark.parametrize(
    ("payload", "reason", "attribute"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_event_becomes_one_dead_letter(
    payload: bytes, reason: str, attribute: str | None
) -> None:
    # Given one invalid event
    # When the payload is parsed
    batch = parse_batch(payload, batch_id="b-1")
    # Then it is one dead letter with the reason, the attribute and the bytes as received
    assert batch.events == []
    [dead] = batch.dead_letters
    assert reason in dead.reason
    assert dead.attribute == attribute
    assert (dead.batch_id, dead.position, dead.raw) == ("b-1", 0, payload.strip())
    if attribute is not None:
        assert dead.reason.startswith(f"{attribute}: ")
    assert len(dead.reason) < 300  # echoes are cut; the 1 MiB event is not repeated
    DeadLetter.from_json(dead.to_json())  # and it can always be stored


def test_corpus_is_large_enough() -> None:
    # Given the corpus / Then it covers at least 35 invalid inputs
    assert len(INVALID) >= 35


def test_the_same_events_fail_the_same_way_inside_an_array() -> None:
    # Given the JSON-valid invalid events of the corpus, as one JSON array
    cases = [case for case in INVALID if case[3] is not None and b"\\ud" not in case[1]]
    payload = b"[" + b",".join(case[1] for case in cases) + b"]"
    # When it is parsed
    batch = parse_batch(payload, batch_id="b-1")
    # Then each element is dead-lettered at its index with the same reason
    assert batch.events == []
    assert [d.position for d in batch.dead_letters] == list(range(len(cases)))
    for dead, (_, _, reason, attribute) in zip(batch.dead_letters, cases, strict=True):
        assert reason in dead.reason
        assert dead.attribute == attribute


def test_echoed_values_are_cut_to_about_80_characters() -> None:
    # Given an event whose specversion is a 5,000-character string
    payload = encoded(specversion="9" * 5000)
    # When it is parsed
    [dead] = parse_batch(payload, batch_id="b").dead_letters
    # Then the reason shows no more than ~80 characters of it
    assert "9" * 80 in dead.reason and "9" * 81 not in dead.reason
    assert dead.reason.endswith("'..., only '1.0' is accepted")


# --- valid edge cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"subject": None, "datacontenttype": None, "dataschema": None, "time": None},
        {"region": None},
        {"region": "", "seq": -(2**31), "big": 2**31 - 1, "flag": False},
        {"a" * 20: "twenty", "0": "digit"},
        {"data": None, "data_base64": "aGVsbG8="},
        {"data": DROP, "data_base64": ""},
        {"data": DROP},
        {"data": "x" * 1000, "dataschema": "https://example.com/schema.json"},
    ],
)
def test_valid_edge_cases(changes: dict[str, Any]) -> None:
    # Given an event on the edge of the rules
    payload = encoded(**changes)
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then it is valid
    assert batch.dead_letters == []
    assert [e.attributes for e in batch.events] == [event(**changes)]


def test_integers_beyond_64_bits_stay_exact() -> None:
    # Given events with integers orjson cannot hold, in NDJSON and in an array
    huge = [2**64, -(2**63) - 1, 10**40, -(10**25)]
    events = [event(id=f"e{i}", data={"n": n, "list": [n, 1.5]}) for i, n in enumerate(huge)]
    # When they are parsed
    for payload in (encode_ndjson(events), json.dumps(events)):
        batch = parse_batch(payload, batch_id="b")
        # Then they are valid and the integers are exact ints
        assert batch.dead_letters == []
        assert [e.attributes["data"]["n"] for e in batch.events] == huge
        assert all(type(e.attributes["data"]["n"]) is int for e in batch.events)


def test_a_float_with_twenty_digits_is_still_a_float() -> None:
    # Given a float written with a long digit run (which makes the stdlib parse it)
    payload = HEAD + b',"data":0.00000000000000000000012345}'
    # When it is parsed / Then it is the same float orjson would give
    [parsed] = parse_batch(payload, batch_id="b").events
    assert parsed.attributes["data"] == 1.2345e-22


def test_nesting_up_to_the_limit_is_accepted() -> None:
    # Given data nested so that the event is exactly MAX_NESTING_DEPTH levels deep
    payload = HEAD + b',"data":' + nested(MAX_NESTING_DEPTH - 1) + b"}"
    # When it is parsed as one event and as an array element / Then it is valid
    assert len(parse_batch(payload, batch_id="b").events) == 1
    assert len(parse_batch(b"[" + payload + b"]", batch_id="b").events) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-05-14T02:09:32Z", datetime(2023, 5, 14, 2, 9, 32, tzinfo=UTC)),
        ("2023-05-14t02:09:32z", datetime(2023, 5, 14, 2, 9, 32, tzinfo=UTC)),
        ("2023-05-14T02:09:32.5Z", datetime(2023, 5, 14, 2, 9, 32, 500000, tzinfo=UTC)),
        ("2023-05-14T02:09:32.123456789Z", datetime(2023, 5, 14, 2, 9, 32, 123456, tzinfo=UTC)),
        ("2023-05-14T02:09:32.9999999z", datetime(2023, 5, 14, 2, 9, 32, 999999, tzinfo=UTC)),
        ("2023-05-14T02:09:32+02:00", datetime(2023, 5, 14, 0, 9, 32, tzinfo=UTC)),
        ("2023-05-14T00:09:32-05:30", datetime(2023, 5, 14, 5, 39, 32, tzinfo=UTC)),
        ("2023-05-14T02:09:32-00:00", datetime(2023, 5, 14, 2, 9, 32, tzinfo=UTC)),
        ("2023-05-14t02:09:32.25+01:00", datetime(2023, 5, 14, 1, 9, 32, 250000, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2024-02-29T12:00:00+23:59", datetime(2024, 2, 28, 12, 1, tzinfo=UTC)),
    ],
)
def test_rfc3339_timestamps_are_read_in_utc(text: str, expected: datetime) -> None:
    # Given an RFC 3339 timestamp / When it is parsed
    parsed = parse_rfc3339(text)
    # Then it is the same instant, in UTC
    assert parsed == expected
    assert parsed.tzinfo is UTC
    assert validate_event(event(time=text)) == expected


def test_validate_event_without_time_returns_none() -> None:
    # Given valid events without time / When validated / Then no time is returned
    assert validate_event(event(time=DROP)) is None
    assert validate_event(event(time=None)) is None


def test_validate_event_rejects_non_objects_and_odd_keys() -> None:
    # Given values that are not JSON objects, or keys JSON cannot have
    # When validated / Then the error says what is wrong
    with pytest.raises(InvalidEventError, match="not a JSON object: got an array") as info:
        validate_event([event()])
    assert info.value.attribute is None
    with pytest.raises(InvalidEventError, match="extension attribute names") as info:
        odd_key: dict[object, object] = {key: value for key, value in event().items()}
        odd_key[7] = "x"
        validate_event(odd_key)
    assert info.value.attribute == "7"


def test_parse_rfc3339_error_names_time() -> None:
    # Given a bad timestamp / When parsed / Then the error is about `time`
    with pytest.raises(InvalidEventError) as info:
        parse_rfc3339("yesterday")
    assert (info.value.attribute, info.value.reason) == (
        "time",
        "time: not an RFC 3339 timestamp: 'yesterday'",
    )


# --- payload formats ----------------------------------------------------------------------------


def test_mixed_ndjson_batch() -> None:
    # Given NDJSON with valid and invalid lines, blank lines and a CRLF line end
    lines = [
        encoded(id="a"),  # 0
        b"",  # 1 blank
        b'{"specversion":',  # 2 malformed
        encoded(id="b", source="ünïcödé") + b"\r",  # 3 CRLF
        encoded(id=DROP),  # 4 missing id
        b'{"id":"\xff"}',  # 5 not UTF-8
        b"   \t",  # 6 blank
        b"  " + encoded(id="c") + b" ",  # 7 spaces around
        b"[1]",  # 8 not an object
        encoded(id="d", time="2023-05-14T02:09:32+02:00"),  # 9
    ]
    payload = b"\n".join(lines) + b"\n"
    # When it is parsed
    batch = parse_batch(payload, batch_id="b-7")
    # Then valid events keep their line index and their line as text
    assert [(e.position, e.attributes["id"]) for e in batch.events] == [
        (0, "a"),
        (3, "b"),
        (7, "c"),
        (9, "d"),
    ]
    assert [e.raw for e in batch.events] == [
        lines[0].decode(),
        lines[3][:-1].decode(),
        lines[7].decode(),
        lines[9].decode(),
    ]
    assert batch.events[3].time == datetime(2023, 5, 14, 0, 9, 32, tzinfo=UTC)
    # And invalid lines are dead letters with their line index and exact bytes
    assert [(d.position, d.raw, d.attribute) for d in batch.dead_letters] == [
        (2, lines[2], None),
        (4, lines[4], "id"),
        (5, lines[5], None),
        (8, lines[8], None),
    ]
    assert {d.batch_id for d in batch.dead_letters} == {"b-7"}


def test_mixed_json_array_batch() -> None:
    # Given a JSON array (the CloudEvents batch format) mixing valid and invalid elements
    elements: list[Any] = [
        event(id="a"),
        event(id=5),
        "not an event",
        event(id="b", data={"ü": [1, 2.5, None]}),
        event(Bad="x"),
    ]
    payload = json.dumps(elements, indent=2, ensure_ascii=False).encode()
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then valid elements keep their index; raw is the element re-serialised compactly
    assert [(e.position, e.attributes["id"]) for e in batch.events] == [(0, "a"), (3, "b")]
    assert [e.raw for e in batch.events] == [orjson.dumps(elements[i]).decode() for i in (0, 3)]
    assert [json.loads(e.raw) for e in batch.events] == [elements[0], elements[3]]
    # And invalid elements are dead letters at their index, with their JSON
    assert [(d.position, d.attribute) for d in batch.dead_letters] == [
        (1, "id"),
        (2, None),
        (4, "Bad"),
    ]
    assert [json.loads(d.raw) for d in batch.dead_letters] == [elements[i] for i in (1, 2, 4)]


def test_array_element_with_lone_surrogate_is_dead_lettered_alone() -> None:
    # Given an array where one element holds a lone surrogate escape
    payload = b"[" + VALID + b"," + HEAD + b',"data":"\\ud800"}]'
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then the valid element goes on and the other names `data`, raw keeping the escape
    assert [e.position for e in batch.events] == [0]
    [dead] = batch.dead_letters
    assert (dead.position, dead.attribute) == (1, "data")
    assert b'"\\ud800"' in dead.raw


def test_array_element_over_the_size_limit() -> None:
    # Given an array with a small and a big event, and a limit between them
    big = encoded(id="big", data="x" * 500)
    payload = b"[" + VALID + b"," + big + b"]"
    # When it is parsed
    batch = parse_batch(payload, batch_id="b", max_event_bytes=300)
    # Then only the big one is dead-lettered, naming the limit
    assert [e.position for e in batch.events] == [0]
    [dead] = batch.dead_letters
    assert dead.position == 1
    assert "over the limit of 300 bytes" in dead.reason
    assert "ICEFLEET_MAX_EVENT_BYTES" in dead.reason


@pytest.mark.parametrize(
    "payload",
    [b"[" + VALID + b",", b"[" + VALID + b"] []", b"[1]\n[2]", b"[" + VALID + b",NaN]", b"[\xff]"],
)
def test_malformed_array_is_one_dead_letter(payload: bytes) -> None:
    # Given a payload that starts as an array but is not one JSON array
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then the whole payload is one dead letter at position 0, bytes as received
    assert batch.events == []
    [dead] = batch.dead_letters
    assert (dead.position, dead.attribute, dead.raw) == (0, None, payload)


def test_single_object_pretty_printed() -> None:
    # Given one event, pretty-printed, with whitespace around it
    payload = "\n  " + json.dumps(event(), indent=2) + "\n\n"
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then it is one event at position 0 whose raw is the stripped payload
    [parsed] = batch.events
    assert (parsed.position, parsed.raw) == (0, payload.strip())
    assert parsed.time == datetime(2023, 5, 14, 2, 9, 32, tzinfo=UTC)


def test_broken_pretty_printed_object_is_one_dead_letter() -> None:
    # Given a pretty-printed event with a syntax error
    payload = json.dumps(event(), indent=2).replace('"id":', '"id"').encode()
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then it is one dead letter, not one per line
    [dead] = batch.dead_letters
    assert (dead.position, dead.raw, dead.attribute) == (0, payload, None)
    assert "not valid JSON" in dead.reason


def test_ndjson_starting_with_garbage_keeps_every_line_apart() -> None:
    # Given NDJSON whose first line is not JSON
    payload = b"oops\n" + VALID + b"\n{broken\n" + encoded(id="z")
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then each bad line is its own dead letter and the valid lines go on
    assert [e.position for e in batch.events] == [1, 3]
    assert [d.position for d in batch.dead_letters] == [0, 2]


@pytest.mark.parametrize("payload", [b"", b"  \n\r\n\t", "", b"[]", b" [ ] "])
def test_empty_payloads_give_an_empty_batch(payload: bytes | str) -> None:
    # Given an empty payload / When parsed / Then nothing comes out
    batch = parse_batch(payload, batch_id="b")
    assert (batch.events, batch.dead_letters) == ([], [])


def test_str_payload_and_byte_order_mark() -> None:
    # Given the same NDJSON as text, and as bytes behind a UTF-8 byte order mark
    text = encode_ndjson([event(id="a", source="ßource"), event(id="b")])
    # When both are parsed / Then they give the same events
    from_text = parse_batch(text, batch_id="b")
    from_bom = parse_batch(b"\xef\xbb\xbf" + text.encode(), batch_id="b")
    assert from_text.events == from_bom.events
    assert [e.attributes["id"] for e in from_text.events] == ["a", "b"]


def test_str_payload_with_a_lone_surrogate_character() -> None:
    # Given text holding a lone surrogate code point (not an escape)
    payload = VALID.decode() + "\n" + '{"id":"\ud800"}'
    # When it is parsed
    batch = parse_batch(payload, batch_id="b")
    # Then that line is dead-lettered as bad UTF-8, the other goes on
    assert len(batch.events) == 1
    [dead] = batch.dead_letters
    assert (dead.position, dead.attribute) == (1, None)
    assert "not valid UTF-8" in dead.reason


@pytest.mark.parametrize("limit", [0, -1])
def test_max_event_bytes_must_be_positive(limit: int) -> None:
    # Given a limit that accepts nothing / When parsing / Then it is a configuration error
    with pytest.raises(ConfigError, match="ICEFLEET_MAX_EVENT_BYTES"):
        parse_batch(VALID, batch_id="b", max_event_bytes=limit)


def test_github_webhooks_are_all_valid() -> None:
    # Given 172 real GitHub webhook deliveries as CloudEvents
    if not GITHUB_WEBHOOKS.exists():
        pytest.skip(f"{GITHUB_WEBHOOKS} is absent")
    payload = GITHUB_WEBHOOKS.read_bytes()
    # When the file is parsed
    batch = parse_batch(payload, batch_id="gh")
    # Then every line is a valid event with a UTC time
    assert batch.dead_letters == []
    assert len(batch.events) == 172
    assert all(e.time is not None and e.time.tzinfo is UTC for e in batch.events)
    assert [e.raw.encode() for e in batch.events] == split_events(payload)


# --- dead letters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dead", "as_base64"),
    [
        (DeadLetter("b-1", 3, "id: must be a non-empty string, got ''", "id", b'{"id":""}'), False),
        (DeadLetter("b-2", 0, "not valid UTF-8: byte 1", None, b"{\xff\xfe}"), True),
        (DeadLetter("b-3", 9, "not valid JSON", None, b""), False),
        (DeadLetter("b-4", 1, "données: ü", "données", "ünï\n\r\t\x00".encode()), False),
        (DeadLetter("b-5", 2, "surrogate bytes", None, b"\xed\xa0\x80 and \x80"), True),
    ],
)
def test_dead_letter_json_round_trip(dead: DeadLetter, as_base64: bool) -> None:
    # Given a dead letter / When written as JSON and read back
    text = dead.to_json()
    # Then it is equal, from text and from bytes; non-UTF-8 raw travels as base64
    assert DeadLetter.from_json(text) == dead
    assert DeadLetter.from_json(text.encode()) == dead
    assert json.loads(text)["raw_base64"] is as_base64


def test_dead_letter_raw_as_text_or_base64() -> None:
    # Given dead letters with UTF-8 and non-UTF-8 raw bytes
    text_record = json.loads(DeadLetter("b", 0, "r", None, b'{"a":1}').to_json())
    binary_record = json.loads(DeadLetter("b", 0, "r", None, b"\xff").to_json())
    # Then UTF-8 raw is stored as text, the rest as base64 with the flag set
    assert (text_record["raw"], text_record["raw_base64"]) == ('{"a":1}', False)
    assert (binary_record["raw"], binary_record["raw_base64"]) == ("/w==", True)


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"batch_id":"b"}',
        '{"batch_id":"b","position":"0","reason":"r","attribute":null,"raw":"","raw_base64":false}',
        '{"batch_id":"b","position":0,"reason":"r","attribute":1,"raw":"","raw_base64":false}',
        '{"batch_id":"b","position":0,"reason":"r","attribute":null,"raw":"%","raw_base64":true}',
        "not json",
    ],
)
def test_dead_letter_from_json_rejects_other_records(text: str) -> None:
    # Given JSON that to_json did not write / When read / Then ValueError
    with pytest.raises(ValueError):
        DeadLetter.from_json(text)


# --- encode_ndjson and split_events -------------------------------------------------------------


def test_encode_ndjson_mixes_mappings_text_and_bytes() -> None:
    # Given a dict, a read-only mapping, text, bytes and pretty-printed JSON text
    items: list[Any] = [
        event(id="a"),
        MappingProxyType(event(id="b")),
        encoded(id="c").decode(),
        encoded(id="d"),
        json.dumps(event(id="e"), indent=2),
    ]
    # When encoded
    text = encode_ndjson(items)
    # Then there is one compact line per item, text and bytes verbatim
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 6
    assert lines[0] == orjson.dumps(event(id="a")).decode()
    assert lines[2:4] == [encoded(id="c").decode(), encoded(id="d").decode()]
    assert lines[4] == orjson.dumps(event(id="e")).decode()
    assert [e.attributes["id"] for e in parse_batch(text, batch_id="b").events] == list("abcde")


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ("{not json\n}", "holds a line break and is not valid JSON"),
        (b"\xff", "not valid UTF-8"),
        ("bad \ud800", "not valid UTF-8"),
        ("  ", "empty"),
        ({"id": "\ud800"}, "surrogates not allowed"),
        ({"n": 2**70, "x": float("nan")}, "cannot be encoded: Out of range float values"),
    ],
)
def test_encode_ndjson_refuses_what_cannot_be_one_line(item: Any, reason: str) -> None:
    # Given an item that cannot become one UTF-8 JSON line
    # When encoded / Then InvalidEventError names the item
    with pytest.raises(InvalidEventError, match=reason) as info:
        encode_ndjson([event(), item])
    assert info.value.reason.startswith("event 1: ")


def test_encode_ndjson_rejects_other_types() -> None:
    # Given something that is not an event / When encoded / Then TypeError
    with pytest.raises(TypeError):
        encode_ndjson([42])  # type: ignore[list-item]


def test_split_events_for_each_format() -> None:
    # Given the same events in each format
    events = [event(id="a"), event(id=1), event(id="c")]
    ndjson = encode_ndjson(events)
    array = json.dumps(events, indent=1)
    # When split / Then the items come out in order
    expected = [orjson.dumps(e) for e in events]
    assert split_events(ndjson) == expected
    assert split_events("\r\n" + ndjson.replace("\n", "\r\n\n")) == expected
    assert split_events(array) == expected
    assert split_events(json.dumps(events[0], indent=2)) == [
        json.dumps(events[0], indent=2).encode()
    ]
    assert split_events(b"[1, 2") == [b"[1, 2"]
    assert split_events(b"\n \n") == []
    assert split_events(b"garbage\n" + VALID) == [b"garbage", VALID]


# --- property: whatever producers encode, icefleet reads back -----------------------------------

CONTEXT = {"id", "source", "specversion", "type", "time", "data", "data_base64"}
CONTEXT |= {"subject", "datacontenttype", "dataschema"}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
times = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets
)
extensions = st.dictionaries(
    st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(lambda name: name not in CONTEXT),
    st.text(max_size=10) | st.integers(min_value=-(2**31), max_value=2**31 - 1) | st.booleans(),
    max_size=3,
)


def rfc3339(when: datetime, style: str) -> str:
    text = when.isoformat()
    if style == "z" and text.endswith("+00:00"):
        text = text[:-6] + "Z"
    return text.replace("T", "t").replace("Z", "z") if style == "lower" else text


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], datetime]:
    when = draw(times)
    attributes = {
        **draw(extensions),
        "specversion": "1.0",
        "id": draw(st.text(min_size=1, max_size=20)),
        "source": draw(st.text(min_size=1, max_size=20)),
        "type": draw(st.text(min_size=1, max_size=20)),
        "time": rfc3339(when, draw(st.sampled_from(["iso", "z", "lower"]))),
        "data": draw(json_values),
    }
    return attributes, when


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(valid_events(), max_size=8))
def test_encoded_valid_events_parse_back(drawn: list[tuple[dict[str, Any], datetime]]) -> None:
    # Given valid events, encoded as NDJSON and as a JSON array
    events = [attributes for attributes, _ in drawn]
    payloads: list[str | bytes] = [encode_ndjson(events), json.dumps(events).encode()]
    for payload in payloads:
        # When each payload is parsed
        batch = parse_batch(payload, batch_id="prop")
        # Then every event comes back, in order, equal, with its time in UTC
        assert batch.dead_letters == []
        assert [e.position for e in batch.events] == list(range(len(events)))
        for parsed, (attributes, when) in zip(batch.events, drawn, strict=True):
            assert parsed.attributes == attributes
            assert (parsed.attributes["id"], parsed.attributes["source"]) == (
                attributes["id"],
                attributes["source"],
            )
            assert parsed.attributes["data"] == attributes["data"]
            assert parsed.time == when and parsed.time is not None
            assert parsed.time.tzinfo is UTC
            assert json.loads(parsed.raw) == attributes


FRAGMENTS = [VALID, HEAD, b"[", b"]", b"{", b"}", b'"', b",", b":", b"\n", b"\r\n", b" "]
FRAGMENTS += [b"\\ud800", b"\xff", b"\xed\xa0\x80", b"123456789012345678901", b"NaN", b"null"]


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.sampled_from([b"", b"[", b"{", b"\xef\xbb\xbf"]),
    st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=20), max_size=16),
)
def test_parse_batch_never_raises(prefix: bytes, pieces: list[bytes]) -> None:
    # Given any bytes made of JSON fragments, odd encodings and noise
    payload = prefix + b"".join(pieces)
    # When they are parsed and split
    batch = parse_batch(payload, batch_id="fuzz", max_event_bytes=200)
    split_events(payload)
    # Then every item is a valid event or a dead letter that can be stored
    for parsed in batch.events:
        assert validate_event(parsed.attributes) == parsed.time
    for dead in batch.dead_letters:
        assert DeadLetter.from_json(dead.to_json()) == dead
        assert dead.attribute is None or dead.reason.startswith(f"{dead.attribute}: ")
