"""How a batch travels in a write-task message (common/ingest/payloads.py): packed, and refused whole
when it does not decode."""

from __future__ import annotations

import base64

import pytest
import zstandard

from common.errors import PayloadEncodingError
from common.ingest.payloads import MAX_UNPACKED_BYTES, ZSTD, pack, unpack

pytestmark = pytest.mark.unit

NDJSON = '{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"x":"é \\u2028"}}\n' * 50


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_packed_payload_unpacks_to_the_same_bytes_and_is_smaller() -> None:
    # Given an NDJSON payload, non-ASCII text included
    # When it is packed for a message and unpacked by a writer
    packed, encoding = pack(NDJSON)
    # Then the writer gets exactly the producer's bytes, from a much smaller message
    assert encoding == ZSTD
    assert unpack(packed, encoding) == NDJSON.encode()
    assert len(packed) < len(NDJSON) / 5


def test_a_lone_surrogate_travels_to_the_writer_to_be_judged_there() -> None:
    # Given text no UTF-8 encoder accepts (the parser dead-letters it with its reason)
    packed, encoding = pack('{"id":"\ud800"}\n')
    # Then it arrives as the same code units, not as an error in the producer
    assert unpack(packed, encoding) == '{"id":"\ud800"}\n'.encode("utf-8", "surrogatepass")


def test_a_payload_without_encoding_is_taken_as_it_is() -> None:
    assert unpack(NDJSON, None) is NDJSON
    assert unpack(b"raw", None) == b"raw"


@pytest.mark.parametrize(
    ("payload", "encoding", "reason"),
    [
        ("not base64!", ZSTD, "not valid base64"),
        (_b64(b"these bytes are no zstd frame"), ZSTD, "no valid frame header"),
        (_b64(zstandard.ZstdCompressor().compress(b"x" * 1000)[:-3]), ZSTD, "truncated"),
        (_b64(zstandard.ZstdCompressor().compress(b"x") * 2), ZSTD, "after its frame"),
        (_b64(zstandard.ZstdCompressor(write_content_size=False).compress(b"x")), ZSTD, "size"),
        ("eA==", "gzip", "unknown payload encoding 'gzip'"),
    ],
    ids=["base64", "not-zstd", "truncated", "two-frames", "no-size", "unknown-encoding"],
)
def test_a_payload_that_does_not_decode_is_refused_with_the_reason(
    payload: str, encoding: str, reason: str
) -> None:
    # When a message carries a payload that is not what its encoding says
    # Then the writer is told why (and dead-letters the message as it came)
    with pytest.raises(PayloadEncodingError, match=reason):
        unpack(payload, encoding)


def test_a_decompression_bomb_is_refused_before_it_is_decompressed() -> None:
    # Given a small message that declares more output than a writer may take
    size = MAX_UNPACKED_BYTES + 1
    stream = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    chunk = b"\0" * (1 << 20)
    parts = [stream.compress(chunk) for _ in range(size // len(chunk))]
    bomb = b"".join([*parts, stream.compress(b"\0" * (size % len(chunk))), stream.flush()])
    assert len(bomb) < 100_000
    # Then it is refused from its frame header, without allocating the output
    with pytest.raises(PayloadEncodingError, match="over the limit"):
        unpack(_b64(bomb), ZSTD)
