"""What the gateway takes from an HTTP request, honoured or refused, never altered.

- ``Content-Encoding``: ``identity`` and ``gzip`` (RFC 9110 §8.4.1.3, every member of the stream)
  are decoded, the body limit applied to the *decoded* size while decoding (a gzip bomb is a
  413 after at most the limit's worth of output); anything else, ``br`` included (no brotli
  binding is installed), is a 415 naming what is accepted.
- Binary-mode ``ce-*`` header values are percent-decoded as the CloudEvents HTTP binding says
  (§3.1.3.2: printable ASCII on the wire, ``%XX`` octets forming UTF-8): a value with raw
  non-ASCII characters, a ``%`` not followed by two hex digits, or octets that are not UTF-8 is
  a 400, never U+FFFD or mojibake.
- Header sections over :data:`MAX_HEADER_BYTES` are a 431 (:class:`HeaderLimit`, before the
  route runs; uvicorn's own parser limit is set above it, so this one answers first).
- A JSON object with the same key twice is a 400: parsers keep one of the values, so the
  event's ``id`` or a column could disagree with its ``raw_event``.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "MAX_HEADER_BYTES",
    "HeaderLimit",
    "RequestError",
    "decode_body",
    "decode_header_value",
    "duplicate_key",
]

MAX_HEADER_BYTES = 16 * 1024  # the whole header section, names and values
UVICORN_HEADER_LIMIT = 4 * MAX_HEADER_BYTES  # h11's own limit, above ours (so we answer 431)
_ENCODED = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*\Z")
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_CHUNK = 64 * 1024


class RequestError(Exception):
    """Raised when a request is refused as a whole; carries the status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- Content-Encoding ------------------------------------------------------------------------------


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as sent before its ``Content-Encoding``; 413 past ``limit`` decoded bytes, 415
    for an encoding not supported, 400 for a stream that does not decode."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):  # the last applied is listed last (RFC 9110 §8.4)
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip"):
            raise RequestError(
                415,
                f"unsupported Content-Encoding {coding!r}: send gzip or identity (no encoding)",
            )
        body = _gunzip(body, limit)
    return body


def _gunzip(body: bytes, limit: int) -> bytes:
    out = bytearray()
    data = body
    while True:
        stream = zlib.decompressobj(_GZIP_WBITS)
        try:
            while data:
                # at most what may still fit plus one byte: a bomb stops here, not in memory
                out += stream.decompress(data, limit - len(out) + 1)
                if len(out) > limit:
                    raise RequestError(
                        413, f"body decodes (gzip) to more than the limit of {limit} bytes"
                    )
                data = stream.unconsumed_tail
            out += stream.flush()
        except zlib.error as exc:
            raise RequestError(
                400, f"Content-Encoding gzip: the body does not decode: {exc}"
            ) from None
        if len(out) > limit:
            raise RequestError(413, f"body decodes (gzip) to more than the limit of {limit} bytes")
        if not stream.eof:
            raise RequestError(400, "Content-Encoding gzip: the body is truncated")
        data = stream.unused_data
        if not data:
            return bytes(out)


# --- binary-mode headers ---------------------------------------------------------------------------


def decode_header_value(name: str, value: str) -> str:
    """A ``ce-*`` header's value, percent-decoded (the CloudEvents HTTP binding, §3.1.3.2)."""
    if not _PRINTABLE_ASCII.match(value):
        raise RequestError(
            400,
            f"{name}: characters outside printable ASCII must be percent-encoded (UTF-8) "
            "in a CloudEvents header",
        )
    if _ENCODED.search(value):
        raise RequestError(400, f"{name}: '%' must start a %XX escape (send '%' as %25)")
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            400, f"{name}: the percent-encoded octets are not UTF-8 ({exc.reason})"
        ) from None


# --- duplicate keys --------------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str, where: str | None = None) -> None:
        super().__init__(key)
        self.key = key
        self.where = where


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)


def _items(text: str, mode: str) -> Iterator[tuple[str, str]]:
    """(where, JSON text) of each event in a body: lines of NDJSON, elements of an array."""
    stripped = text.strip()
    if mode == "ndjson":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield f"line {n}", line
    elif stripped.startswith("["):
        yield "array", stripped
    else:
        yield "the event", stripped


def duplicate_key(body: bytes, mode: str) -> str | None:
    """Where a JSON object of the body holds a key twice, and which key; ``None`` when none does.
    Bodies that are not JSON are left to the event parser, which says what is wrong with them."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for where, item in _items(text, mode):
        try:
            if where == "array":
                where = _check_elements(item)
            else:
                _DECODER.decode(item)
        except _DuplicateKeyError as dup:
            return f"{dup.where or where}: a JSON object has the key {dup.key[:100]!r} twice"
        except (ValueError, RecursionError):
            continue
    return None


_WS = re.compile(r"[ \t\n\r]*")


def _check_elements(text: str) -> str:
    """Decode a JSON array element by element; a duplicate is raised with ``element N`` set as
    the place by the caller (returned here when no element has one)."""
    index = _WS.match(text, 1).end()  # type: ignore[union-attr]
    n = 0
    while index < len(text) and text[index] != "]":
        try:
            _, index = _DECODER.raw_decode(text, index)
        except _DuplicateKeyError as dup:
            raise _DuplicateKeyError(dup.key, f"element {n}") from None
        index = _WS.match(text, index).end()  # type: ignore[union-attr]
        if text[index : index + 1] == ",":
            index = _WS.match(text, index + 1).end()  # type: ignore[union-attr]
        n += 1
    return "the array"


# --- header size -----------------------------------------------------------------------------------


class HeaderLimit:
    """Answer 431 to a request whose header section is over :data:`MAX_HEADER_BYTES`."""

    def __init__(self, app: ASGIApp, limit: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.limit:
                body = json.dumps(
                    {"error": f"request headers of {size} bytes, over the limit of {self.limit}"}
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 431,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
