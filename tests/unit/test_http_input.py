"""HTTP inputs honoured or refused, never altered (workers/http_input.py), without a server; over
real HTTP in tests/integration/test_http_inputs.py."""

from __future__ import annotations

import gzip

import pytest

from workers.http_input import RequestError, decode_body, decode_header_value, duplicate_key

pytestmark = pytest.mark.unit


def refused(call: object, *args: object) -> RequestError:
    with pytest.raises(RequestError) as raised:
        call(*args)  # type: ignore[operator]
    return raised.value


def test_gzip_is_decoded_every_member_and_identity_left_alone() -> None:
    body = b'{"id": "\xc3\xa9"}'
    assert decode_body(gzip.compress(body), "gzip", 1_000) == body
    assert decode_body(gzip.compress(body[:5]) + gzip.compress(body[5:]), "GZIP", 1_000) == body
    assert decode_body(body, "identity", 1_000) == body
    assert decode_body(body, None, 1_000) == body


def test_the_limit_applies_to_the_decoded_size() -> None:
    bomb = gzip.compress(b"0" * 1_000_000)  # ~1 kB that decodes to 1 MB
    assert len(bomb) < 2_000
    error = refused(decode_body, bomb, "gzip", 100_000)
    assert error.status == 413 and "100000 bytes" in error.reason
    assert decode_body(gzip.compress(b"0" * 100_000), "gzip", 100_000) == b"0" * 100_000


@pytest.mark.parametrize("encoding", ["br", "deflate", "compress", "zstd", "gzip, br"])
def test_other_encodings_are_415(encoding: str) -> None:
    error = refused(decode_body, b"x", encoding, 100)
    assert error.status == 415 and "gzip" in error.reason


@pytest.mark.parametrize("body", [b"not gzip", gzip.compress(b'{"a": 1}')[:-6]])
def test_a_stream_that_does_not_decode_is_400(body: bytes) -> None:
    assert refused(decode_body, body, "gzip", 100).status == 400


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [("/shop", "/shop"), ("caf%C3%A9%20%22x%22", 'café "x"'), ("100%25", "100%"), ("", "")],
)
def test_header_values_are_percent_decoded_utf8(raw: str, decoded: str) -> None:
    assert decode_header_value("ce-source", raw) == decoded


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("café", "printable ASCII"),
        ("tab\there", "printable ASCII"),
        ("50%", "%XX"),
        ("%zz", "%XX"),
        ("%FF%FE", "not UTF-8"),
        ("%C3", "not UTF-8"),
    ],
)
def test_header_values_that_are_not_percent_encoded_utf8_are_400(raw: str, why: str) -> None:
    error = refused(decode_header_value, "ce-subject", raw)
    assert error.status == 400 and why in error.reason and "ce-subject" in error.reason


@pytest.mark.parametrize(
    ("body", "mode", "where"),
    [
        (b'{"id": "a", "type": "t", "id": "b"}', "structured", "the event: "),
        (b'[{"id": "a"}, {"id": "b", "data": {"x": 1, "x": 2}}]', "batch", "element 1: "),
        (b'{"id": "a"}\n\n{"id": "b", "id": "c"}\n', "ndjson", "line 3: "),
    ],
)
def test_a_key_twice_in_one_object_is_found_with_where(body: bytes, mode: str, where: str) -> None:
    found = duplicate_key(body, mode)
    assert found is not None and found.startswith(where)


@pytest.mark.parametrize(
    ("body", "mode"),
    [
        (b'[{"id": "a"}, {"id": "b"}]', "batch"),
        (b'{"a": {"id": 1}, "b": {"id": 2}}', "json"),
        (b"not json", "structured"),
        (b"\xff\xfe", "ndjson"),
        (b"[]", "batch"),
    ],
)
def test_bodies_without_a_key_twice_pass(body: bytes, mode: str) -> None:
    assert duplicate_key(body, mode) is None
