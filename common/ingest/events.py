"""CloudEvents 1.0 structured-mode JSON: cut payloads into events, validate, dead-letter the rest.

A payload is one event object, a JSON array of them (which is also the CloudEvents batch format,
``application/cloudevents-batch+json``) or NDJSON. :func:`parse_batch` never raises on bad input:
every item that is not a valid event becomes a :class:`DeadLetter` carrying its bytes and a reason
that starts with the attribute at fault, and the valid events of the same payload go on.

Parsing uses orjson. The standard library's ``json`` takes over for one item when orjson refuses
it (so a lone ``\\ud800`` escape gets a precise reason) or may have rounded an integer beyond 64 bits
to a float (orjson does that silently, ijl/orjson#308), so such integers stay exact.
"""

from __future__ import annotations

import base64
import gc
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from common.errors import ConfigError, InvalidEventError

__all__ = [
    "MAX_NESTING_DEPTH",
    "DeadLetter",
    "Event",
    "ParsedBatch",
    "encode_ndjson",
    "parse_batch",
    "parse_rfc3339",
    "split_events",
    "validate_event",
]

#: Deepest nesting of objects and arrays in an event, the event object being level 1. orjson
#: cannot serialise more than 255 levels, so deeper events could not be written later.
MAX_NESTING_DEPTH = 128

_OPTIONAL = ("subject", "datacontenttype", "dataschema")
_CONTEXT = frozenset(
    ("id", "source", "specversion", "type", "time", "data", "data_base64", *_OPTIONAL)
)
_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
_NAMES_SEEN: set[str] = set()  # extension names known to be valid, to skip the regex
_PLAIN = frozenset((str, bool, type(None)))
_STR_KINDS = frozenset((str,))  # extension value types with nothing more to check
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9]|60)"
    r"(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))"
)
_JSON_WS = b" \t\r\n"
_UNPARSED = object()
_SHOW = 80  # longest echo of an input value in a reason
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")


@dataclass(frozen=True, slots=True)
class Event:
    """One valid event: its attributes, its text as received, its place in the payload, its time.

    ``raw`` is the NDJSON line as received (without its line terminator), the whole payload
    stripped of whitespace for a single object, or, for an element of a JSON array, the element
    re-serialised compactly with orjson (JSON-equal to the input, not byte-equal).
    """

    attributes: dict[str, Any]
    raw: str
    position: int
    time: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item of a payload that is not a valid event, kept byte for byte with the reason."""

    batch_id: str
    position: int
    reason: str
    attribute: str | None
    raw: bytes

    def to_json(self) -> str:
        """One JSON object; ``raw`` is UTF-8 text, or base64 with ``raw_base64: true``."""
        try:
            raw, is_base64 = self.raw.decode("utf-8"), False
        except UnicodeDecodeError:
            raw, is_base64 = base64.b64encode(self.raw).decode("ascii"), True
        fields = (self.batch_id, self.position, self.reason, self.attribute, raw, is_base64)
        return orjson.dumps(dict(zip(_DEAD_LETTER_FIELDS, fields, strict=True))).decode("utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        """Read back what :meth:`to_json` wrote; ``ValueError`` if ``text`` is not such a record."""
        record = orjson.loads(text)
        values: list[Any] = (
            [record.get(key) for key in _DEAD_LETTER_FIELDS] if type(record) is dict else []
        )
        kinds = [type(value) for value in values]
        if kinds[3:4] == [type(None)]:
            kinds[3] = str  # attribute: a string or null
        if kinds != [str, int, str, str, str, bool]:
            raise ValueError(f"not a dead-letter record: {str(text)[:_SHOW]!r}")
        batch_id, position, reason, attribute, raw, is_base64 = values
        data = base64.b64decode(raw, validate=True) if is_base64 else raw.encode("utf-8")
        return cls(batch_id, position, reason, attribute, data)


_DEAD_LETTER_FIELDS = ("batch_id", "position", "reason", "attribute", "raw", "raw_base64")


@dataclass(slots=True)
class ParsedBatch:
    """The outcome of :func:`parse_batch`: valid events and dead letters, each in payload order."""

    events: list[Event]
    dead_letters: list[DeadLetter]


# --- validation ----------------------------------------------------------------------------------


def validate_event(obj: object) -> datetime | None:
    """Check ``obj`` against the CloudEvents 1.0 JSON format; return its ``time`` in UTC, or None.

    Raises :class:`InvalidEventError` naming the first attribute at fault. A ``null`` optional
    attribute counts as absent. Extension values are strings, booleans or CloudEvents Integers
    (32-bit signed, as the spec says).
    """
    if type(obj) is not dict:
        raise InvalidEventError(f"not a JSON object: got {_describe(obj)}")
    get = obj.get
    version = get("specversion")
    if version != "1.0" or type(version) is not str:
        raise _string_fault("specversion", version, missing="specversion" not in obj)
    # The common case in a few C-level steps; any doubt takes the attribute-by-attribute path,
    # which finds the first attribute at fault.
    required = (get("id"), get("source"), get("type"))
    if not _STR_KINDS.issuperset(map(type, required)) or not all(required):
        _raise_required_fault(obj)
    for name in _OPTIONAL:
        value = get(name)
        if value is not None and (type(value) is not str or not value):
            raise _string_fault(name, value, missing=False)
    encoded = get("data_base64")
    if encoded is not None:
        _check_base64(encoded, has_data=get("data") is not None)
    if not _CONTEXT.issuperset(obj):
        for key, value in obj.items():
            if key not in _CONTEXT and (key not in _NAMES_SEEN or type(value) not in _PLAIN):
                _check_extension(key, value)
    when = get("time")
    if when is None:
        return None
    if type(when) is not str:
        raise _fault("time", f"must be an RFC 3339 timestamp string, got {_describe(when)}")
    return parse_rfc3339(when)


def _raise_required_fault(obj: dict[str, Any]) -> None:
    """Raise for the first of ``id``, ``source``, ``type`` that is not a non-empty string."""
    for name in ("id", "source", "type"):
        value = obj.get(name)
        if type(value) is not str or not value:
            raise _string_fault(name, value, missing=name not in obj)


def parse_rfc3339(value: str) -> datetime:
    """Parse an RFC 3339 ``date-time`` into an aware datetime in UTC.

    Fractional seconds beyond microseconds are truncated; a leap second (``:60``) becomes
    ``:59.999999``. Raises :class:`InvalidEventError` (attribute ``time``) on anything else.
    """
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _fault("time", f"not an RFC 3339 timestamp: {_describe(value)}")
    try:
        try:  # the regex admits only RFC 3339, and Python 3.11 reads all of it but t, z and :60
            when = datetime.fromisoformat(value)
        except ValueError:
            when = _from_fields(*match.groups())
        return when if when.tzinfo is UTC else when.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise _fault("time", f"not an RFC 3339 timestamp: {_describe(value)} ({exc})") from None


def _from_fields(*fields: str) -> datetime:
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = fields
    micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
    sec = int(second)
    if sec == 60:
        sec, micro = 59, 999_999
    offset = timedelta(hours=int(off_h), minutes=int(off_m)) if sign else timedelta(0)
    zone = timezone(-offset if sign == "-" else offset)
    return datetime(int(year), int(month), int(day), int(hour), int(minute), sec, micro, zone)


def _fault(attribute: str, problem: str) -> InvalidEventError:
    return InvalidEventError(f"{attribute}: {problem}", attribute)


def _string_fault(name: str, value: object, *, missing: bool) -> InvalidEventError:
    if missing:
        return _fault(name, "required attribute is missing")
    if name == "specversion" and type(value) is str:
        return _fault(name, f"unsupported version {_describe(value)}, only '1.0' is accepted")
    expected = "the string '1.0'" if name == "specversion" else "a non-empty string"
    return _fault(name, f"must be {expected}, got {_describe(value)}")


def _check_base64(encoded: object, *, has_data: bool) -> None:
    if has_data:
        raise _fault("data_base64", "not allowed together with data")
    if type(encoded) is not str:
        raise _fault("data_base64", f"must be a base64 string, got {_describe(encoded)}")
    try:
        base64.b64decode(encoded, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise _fault("data_base64", f"not valid base64 ({exc}): {_describe(encoded)}") from None


def _check_extension(name: object, value: object) -> None:
    if type(name) is not str or _EXTENSION_NAME.fullmatch(name) is None:
        raise _fault(_name(name), "extension attribute names must be 1 to 20 characters a-z, 0-9")
    if len(_NAMES_SEEN) < 10_000:
        _NAMES_SEEN.add(name)
    kind = type(value)
    if value is None or kind is str or kind is bool:
        return
    if kind is not int:
        raise _fault(
            name, f"extension values must be string, integer or boolean: {_describe(value)}"
        )
    if not -(2**31) <= value < 2**31:  # type: ignore[operator]
        raise _fault(name, f"integer {_describe(value)} is outside the 32-bit CloudEvents range")


def _describe(value: object) -> str:
    """Show an input value in a reason: JSON type names, strings quoted and cut to ~80 chars."""
    if value is None or type(value) is bool:
        return "null" if value is None else str(value).lower()
    if isinstance(value, str):
        return repr(value[:_SHOW]) + ("..." if len(value) > _SHOW else "")
    if isinstance(value, int) and value.bit_length() > 256:
        return "a number of more than 77 digits"
    if isinstance(value, int | float):
        return repr(value)
    return (
        "an object" if isinstance(value, dict) else "an array" if isinstance(value, list) else "?"
    )


def _name(name: object) -> str:
    """An attribute name fit for a reason and a Parquet column: text, cut, no lone surrogates."""
    text = name if isinstance(name, str) else repr(name)
    return text[:_SHOW].encode("utf-8", "backslashreplace").decode("utf-8") or "''"


# --- one item ------------------------------------------------------------------------------------


def _loads(data: bytes) -> tuple[Any, bool]:
    """Parse JSON bytes; return the value and whether the standard library had to parse it."""
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError):
        pass
    else:
        if not _may_hold_big_int(data):
            return value, False
    return _loads_stdlib(data)


def _may_hold_big_int(data: bytes) -> bool:
    """orjson rounds integers over 64 bits: any run of 20 digits, or '-' and 19, may be one."""
    digits = data.translate(_DIGITS_TO_ZERO)
    return b"0" * 20 in digits or b"-" + b"0" * 19 in digits


def _loads_stdlib(data: bytes) -> tuple[Any, bool]:
    """Parse with the standard library: exact big integers, precise reasons for bad input."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEventError(f"not valid UTF-8: byte {exc.start} ({exc.reason})") from None
    try:
        return json.loads(text, parse_constant=_finite, parse_float=_finite), True
    except RecursionError:
        raise InvalidEventError("not accepted JSON: nested too deeply to parse") from None
    except ValueError as exc:
        raise InvalidEventError(f"not valid JSON: {str(exc)[:160]}") from None


def _finite(text: str) -> float:
    if not math.isfinite(number := float(text)):  # NaN and Infinity are not JSON; 1e400 too big
        raise ValueError(f"{text[:_SHOW]} is not a finite JSON number")
    return number


def _check_object(value: Any, raw: bytes, via_stdlib: bool) -> dict[str, Any]:
    """Reject what parsed as JSON but cannot be an event: non-objects, surrogates, deep nesting."""
    if type(value) is not dict:
        raise InvalidEventError(f"not a JSON object: got {_describe(value)}")
    if not raw or raw.count(b"{") + raw.count(b"[") > MAX_NESTING_DEPTH:
        for key, item in value.items():
            if _deeper_than(item, MAX_NESTING_DEPTH - 1):
                raise _fault(_name(key), f"nested deeper than {MAX_NESTING_DEPTH} levels")
    for key, item in value.items() if via_stdlib else ():  # after the depth check: dumps recurses
        try:
            json.dumps([key, item], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _fault(_name(key), "holds a lone UTF-16 surrogate (e.g. \\ud800)") from None
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """True if containers nest more than ``limit`` levels in ``value`` (itself level 1)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        for child in item.values() if type(item) is dict else item if type(item) is list else ():
            if type(child) is dict or type(child) is list:
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _check_size(raw: bytes, limit: int) -> None:
    if len(raw) > limit:
        raise InvalidEventError(
            f"event is {len(raw)} bytes, over the limit of {limit} bytes "
            "(raise ICEFLEET_MAX_EVENT_BYTES to accept larger events)"
        )


def _dumps(value: Any, *, strict: bool = False) -> bytes:
    """Serialise compactly: orjson, else the stdlib (ints beyond 64 bits, surrogates, deep).

    Lone surrogates become ``\\ud800`` escapes and too deep a value ``b""``, unless ``strict``.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        if strict:
            raise
    try:
        return json.dumps(value, separators=(",", ":")).encode("ascii")
    except RecursionError:
        return b""  # nested ~1,000 levels deep: _check_object rejects it


# --- payloads ------------------------------------------------------------------------------------


def _body(payload: bytes | str) -> tuple[bytes, bytes, str]:
    """The payload as received (bytes), its body (no BOM; stripped if one object) and layout."""
    received = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    body = received.removeprefix(b"\xef\xbb\xbf")
    start = len(body) - len(body.lstrip(_JSON_WS))  # lstrip copies only if there is whitespace
    first = body[start : start + 1]
    if first != b"{":
        return received, body, "array" if first == b"[" else "lines"
    newline = body.find(b"\n", start)
    first_line = body[start:newline].strip(_JSON_WS) if newline != -1 else b"{"
    if first_line != b"{":  # more than one line, and not pretty-printed
        for candidate, layout in ((first_line, "lines"), (body, "object")):
            try:
                orjson.loads(candidate)
            except (orjson.JSONDecodeError, RecursionError):
                continue
            return received, body if layout == "lines" else body.strip(_JSON_WS), layout
        return received, body, "lines"
    return received, body.strip(_JSON_WS), "object"


def _items(body: bytes, layout: str) -> list[tuple[int, bytes, Any, bool]]:
    """(position, raw, value or _UNPARSED, parsed by the stdlib) per item; raises if bad array."""
    if layout == "array":
        elements, via_stdlib = _loads(body)
        return [(at, _dumps(element), element, via_stdlib) for at, element in enumerate(elements)]
    if layout == "object":
        return [(0, body, _UNPARSED, False)]
    lines = (line[:-1] if line[-1:] == b"\r" else line for line in body.split(b"\n"))
    return [(at, line, _UNPARSED, False) for at, line in enumerate(lines) if line.strip(_JSON_WS)]


def parse_batch(
    payload: bytes | str, *, batch_id: str, max_event_bytes: int = 1_048_576
) -> ParsedBatch:
    """Parse and validate every event of a payload; items that fail become dead letters.

    Positions are line indexes for NDJSON (blank lines count), element indexes for arrays and 0
    for a single object or a whole-payload failure. A leading UTF-8 byte order mark is ignored.
    Never raises on bad input; raises :class:`ConfigError` if ``max_event_bytes`` is not positive.
    """
    if max_event_bytes <= 0:
        raise ConfigError("ICEFLEET_MAX_EVENT_BYTES", str(max_event_bytes), "a positive integer")
    with paused_gc():
        return _parse(payload, batch_id, max_event_bytes)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch's objects are made.

    Parsing a batch allocates hundreds of thousands of dicts and lists that all stay alive, and
    every few hundred allocations Python's collector runs and traverses them again (and, as they
    age, the whole heap): with it on, ``orjson.loads`` of 10,000 events takes three times as
    long. Reference counting still frees everything as usual; the collector runs again as soon
    as the outermost pause ends. Never turns on a collector that was off before.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _parse(payload: bytes | str, batch_id: str, max_event_bytes: int) -> ParsedBatch:
    received, body, layout = _body(payload)
    batch = ParsedBatch([], [])
    # One scan of the whole body instead of one per item: no item holds a run of digits that
    # the body does not hold (items are slices of it, or re-serialised from one parse of it).
    fast = not _may_hold_big_int(body)
    if layout == "lines" and fast:
        _parse_lines(body, batch_id, max_event_bytes, batch)
        return batch
    try:
        items = _items(body, layout)
    except InvalidEventError as exc:
        reason = exc.reason.replace("not valid JSON", "not a valid JSON array", 1)
        batch.dead_letters.append(DeadLetter(batch_id, 0, reason, None, received))
        return batch
    events, dead_letters = batch.events, batch.dead_letters
    for position, raw, value, via_stdlib in items:
        try:
            if value is _UNPARSED and fast and len(raw) <= max_event_bytes:
                value = _decode(raw)
            else:
                _check_size(raw, max_event_bytes)
                if value is _UNPARSED:
                    value, via_stdlib = _loads(raw)
                value = _check_object(value, raw, via_stdlib)
            when = validate_event(value)
        except InvalidEventError as exc:
            dead_letters.append(DeadLetter(batch_id, position, exc.reason, exc.attribute, raw))
        else:
            events.append(Event(value, raw.decode("utf-8"), position, when))
    return batch


def _decode(raw: bytes) -> Any:
    """One item within the size limit, from a payload with no integer beyond 64 bits: orjson,
    the standard library only for what orjson refuses (precise reasons), and the object checks
    only where they can fail (not an object, parsed by the standard library, maybe too deep)."""
    try:
        value, via_stdlib = orjson.loads(raw), False
    except (orjson.JSONDecodeError, RecursionError):
        value, via_stdlib = _loads_stdlib(raw)
    if (
        type(value) is not dict
        or via_stdlib
        or raw.count(b"{") + raw.count(b"[") > MAX_NESTING_DEPTH
    ):
        value = _check_object(value, raw, via_stdlib)
    return value


def _parse_lines(body: bytes, batch_id: str, max_event_bytes: int, batch: ParsedBatch) -> None:
    """The loop of :func:`_parse` for NDJSON that holds no integer beyond 64 bits: the same
    items (:func:`_items`) and the same outcome, with less work per line."""
    events, dead_letters = batch.events, batch.dead_letters
    for position, line in enumerate(body.split(b"\n")):
        raw = line[:-1] if line[-1:] == b"\r" else line
        if raw[:1] != b"{" and not raw.strip(_JSON_WS):
            continue  # a blank line
        try:
            if len(raw) > max_event_bytes:
                _check_size(raw, max_event_bytes)  # raises
            value = _decode(raw)
            when = validate_event(value)
        except InvalidEventError as exc:
            dead_letters.append(DeadLetter(batch_id, position, exc.reason, exc.attribute, raw))
        else:
            events.append(Event(value, raw.decode("utf-8"), position, when))


def split_events(payload: bytes | str) -> list[bytes]:
    """Cut a payload into its raw items (lines, re-serialised array elements, or one object).

    Items are not validated: bad ones are dead-lettered when parsed. A malformed JSON array comes
    back whole, as ``[payload]``; an empty payload as ``[]``.
    """
    received, body, layout = _body(payload)
    try:
        return [raw for _, raw, _, _ in _items(body, layout)]
    except InvalidEventError:
        return [received]


def encode_ndjson(events: Iterable[Mapping[str, Any] | str | bytes]) -> str:
    """Encode events as NDJSON, one per line, each line ending in a newline.

    Mappings are serialised compactly with orjson (the standard library for integers beyond 64
    bits); ``str``/``bytes`` are kept verbatim unless they hold a line break, in which case they
    are re-serialised if they are JSON. Nothing is validated as a CloudEvent here (and orjson
    writes a float NaN as null). Raises :class:`InvalidEventError` for an item that cannot
    become one UTF-8 line.
    """
    lines = []
    for index, event in enumerate(events):
        if isinstance(event, str | bytes):
            lines.append(_verbatim_line(event, index))
        elif isinstance(event, Mapping):
            try:
                raw = _dumps(event if isinstance(event, dict) else dict(event), strict=True)
            except (ValueError, RecursionError) as exc:  # NaN, lone surrogates, too deep
                raise InvalidEventError(f"event {index}: cannot be encoded: {exc}") from None
            lines.append(raw.decode("utf-8"))
        else:
            raise TypeError(f"event {index}: expected a mapping, str or bytes, got {type(event)}")
    return "".join(f"{line}\n" for line in lines)


def _verbatim_line(event: str | bytes, index: int) -> str:
    try:
        text = event.decode("utf-8") if isinstance(event, bytes) else event
        text.encode("utf-8")
    except UnicodeError:
        raise InvalidEventError(f"event {index}: not valid UTF-8 text") from None
    if not text.strip():
        raise InvalidEventError(f"event {index}: empty")
    if "\n" not in text and "\r" not in text:
        return text
    try:
        value, _ = _loads(text.encode("utf-8"))
    except InvalidEventError:
        reason = f"event {index}: holds a line break and is not valid JSON, so cannot be one line"
        raise InvalidEventError(reason) from None
    return _dumps(value).decode("utf-8")
