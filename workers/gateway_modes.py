"""The CloudEvents HTTP protocol binding (v1.0.2): a request's body and headers decoded into
events, in the mode its ``Content-Type`` says (see :mod:`workers.gateway` for the answers).

- **structured** mode, ``Content-Type: application/cloudevents+json``: the body is one event;
- **batched** mode, ``application/cloudevents-batch+json``: the body is a JSON array of events;
- **binary** mode, any other content type with ``ce-*`` headers: the attributes travel in headers
  (``ce-id``, ``ce-source``, ``ce-type``, ``ce-specversion``, ``ce-time``, extensions...,
  percent-decoded as the binding says), the body is the event's data and ``Content-Type`` its
  ``datacontenttype``; a JSON body (``application/json``, ``*+json``) becomes ``data`` byte for
  byte, any other ``data_base64``;
- and, as a convenience, ``application/json`` (an object or an array) and NDJSON
  (``application/x-ndjson``).

Every event is validated by :func:`common.ingest.events.parse_batch`, the writer's own rules, so
what is accepted here is what a writer lands.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from common.ingest.events import Event, parse_batch
from workers.http_input import RequestError, decode_header_value

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
NDJSON = ("application/x-ndjson", "application/ndjson")
_JSON_WS = b" \t\r\n"
# Headers that cannot carry attributes in binary mode: the body is the data.
_NOT_HEADERS = ("data", "data_base64", "datacontenttype")


@dataclass(frozen=True)
class Rejection:
    """One event of a request that is not valid, with where it was and why."""

    position: int
    reason: str


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` value, lowercase, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(mtype: str) -> bool:
    return mtype == JSON or mtype.endswith("+json")


def _valid_json(body: bytes) -> bool:
    """Whether ``body`` is exactly one JSON value (orjson, else the standard library, which also
    reads what orjson refuses but the writer may still judge precisely, like lone surrogates)."""
    try:
        orjson.loads(body)
        return True
    except orjson.JSONDecodeError:
        pass
    try:
        json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return True


def binary_event(headers: Mapping[str, str], body: bytes, content_type: str | None) -> bytes:
    """The structured JSON of a binary-mode event: attributes from the ``ce-*`` headers, the
    body as ``data`` (JSON, spliced in verbatim) or ``data_base64``. Raises :class:`RequestError`
    (400) when a header names the data or a JSON body is not one JSON value."""
    attributes: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if not lowered.startswith("ce-"):
            continue
        attribute = lowered[3:]
        if attribute in _NOT_HEADERS:
            raise RequestError(
                400,
                f"{name}: not allowed in binary mode (the body is the data, "
                "Content-Type its datacontenttype)",
            )
        attributes[attribute] = decode_header_value(name, value)
    if content_type:
        attributes["datacontenttype"] = content_type
    head = orjson.dumps(attributes)
    stripped = body.strip(_JSON_WS)
    if not stripped:
        return head
    if _is_json(media_type(content_type)):
        # Verbatim, so the writer sees the producer's numbers and keys exactly; only a single
        # JSON value may be spliced in (anything else could smuggle attributes after it).
        if not _valid_json(stripped):
            raise RequestError(
                400, f"data: the body is not one valid JSON value (Content-Type {content_type})"
            )
        return head[:-1] + b',"data":' + stripped + b"}"
    encoded = base64.b64encode(body).decode("ascii")
    return head[:-1] + b',"data_base64":' + orjson.dumps(encoded) + b"}"


def _first_byte(body: bytes) -> bytes:
    stripped = body.lstrip(_JSON_WS).removeprefix(b"\xef\xbb\xbf").lstrip(_JSON_WS)
    return stripped[:1]


def request_mode(content_type: str | None, headers: Mapping[str, str]) -> str:
    """``structured``, ``batch``, ``binary``, ``json`` or ``ndjson``; 415 for anything else."""
    mtype = media_type(content_type)
    if mtype == STRUCTURED:
        return "structured"
    if mtype == BATCH:
        return "batch"
    if any(name.lower() == "ce-specversion" for name in headers):
        return "binary"
    if mtype == JSON:
        return "json"
    if mtype in NDJSON:
        return "ndjson"
    raise RequestError(
        415,
        f"unsupported Content-Type {content_type or '(none)'!r}: send {STRUCTURED}, {BATCH}, "
        f"{JSON}, {NDJSON[0]}, or any type with ce-* headers (binary mode)",
    )


def parse_request(
    mode: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_event_bytes: int,
) -> tuple[list[Event], list[Rejection]]:
    """The valid events of a request body and the rejections, in the body's order."""
    if mode == "binary":
        body = binary_event(headers, body, headers.get("content-type"))
    elif mode == "structured" and _first_byte(body) != b"{":
        raise RequestError(
            400, f"structured mode ({STRUCTURED}) carries one event object; send arrays as {BATCH}"
        )
    elif mode == "batch" and _first_byte(body) != b"[":
        raise RequestError(400, f"a CloudEvents batch ({BATCH}) is a JSON array of events")
    if not body.strip(_JSON_WS):
        raise RequestError(400, "the body holds no events")
    parsed = parse_batch(body, batch_id="http", max_event_bytes=max_event_bytes)
    rejected = [Rejection(d.position, d.reason) for d in parsed.dead_letters]
    if mode in ("structured", "binary") and len(parsed.events) + len(rejected) > 1:
        raise RequestError(400, f"{mode} mode carries exactly one event")
    if not parsed.events and not rejected:
        raise RequestError(400, "the body holds no events")
    return parsed.events, rejected


__all__ = [
    "BATCH",
    "JSON",
    "NDJSON",
    "STRUCTURED",
    "Rejection",
    "RequestError",
    "binary_event",
    "media_type",
    "parse_request",
    "request_mode",
]
