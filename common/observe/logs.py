"""Structured logs: JSON (or text) lines carrying the batch id and table, credentials masked.

Stdlib :mod:`logging` only: Celery, pyiceberg, kombu and uvicorn all log through it, so one
handler on the root logger formats everything a process says, ours and theirs. (structlog would
add a second pipeline to keep in step with the first for no gain here.)

- :func:`log_context` puts a batch id and a table name into context variables; every record
  logged inside it carries them (``extra={"batch_id": ..., "table": ...}`` works too, and wins).
- :class:`RedactionFilter` masks URL passwords (``redis://:pw@host``), ``Bearer`` tokens,
  ``password=...``-style pairs and extra fields whose names look secret, in the message, the
  arguments, exception text and extras, before any formatter sees them.
- :class:`JsonFormatter` writes one JSON object per line.

:func:`configure_logging` installs that on the root logger (the CLI's ``serve``);
:func:`instrument_handler` adds it to handlers someone else made (Celery's, see
``workers/observability.py``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from common.redaction import REDACTED, is_secret_name, redact_text

__all__ = [
    "JsonFormatter",
    "RedactionFilter",
    "configure_logging",
    "current_context",
    "instrument_handler",
    "log_context",
    "redact_secrets",
]

LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"

_batch_id: ContextVar[str | None] = ContextVar("icefleet_batch_id", default=None)
_table: ContextVar[str | None] = ContextVar("icefleet_table", default=None)

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "context",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
_CONTEXT_FIELDS = ("batch_id", "table")

# "password=hunter2", "token: abc", '"secret_access_key": "x y"', "api-key=...": a quoted value
# is masked up to its closing quote, a bare one up to a space or separator.
_SECRET_PAIR = re.compile(
    r"""(?P<key>["']?[\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|credential)[\w.-]*["']?)"""
    r"""(?P<sep>\s*[:=]\s*)(?P<value>"[^"]*"|'[^']*'|[^\s"',;}&]+)""",
    re.I,
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.I)


_NOT_SECRETS = frozenset(("", "None", "null", REDACTED))  # "token=None" tells, hides nothing


def _mask_pair(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[0] in "\"'" else ""
    if value.strip("\"'") in _NOT_SECRETS:
        return match.group(0)
    return f"{match.group('key')}{match.group('sep')}{quote}{REDACTED}{quote}"


def redact_secrets(text: str) -> str:
    """Mask URL passwords, ``Bearer``/``Basic`` credentials and ``secret=value`` pairs."""
    text = redact_text(text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _SECRET_PAIR.sub(_mask_pair, text)


@contextmanager
def log_context(*, batch_id: str | None = None, table: str | None = None) -> Iterator[None]:
    """Within the block, records carry ``batch_id`` and ``table`` (those given; others kept)."""
    tokens = []
    if batch_id is not None:
        tokens.append((_batch_id, _batch_id.set(batch_id)))
    if table is not None:
        tokens.append((_table, _table.set(table)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_context() -> dict[str, str]:
    """The batch id and table of the current context, those that are set."""
    values = {"batch_id": _batch_id.get(), "table": _table.get()}
    return {key: value for key, value in values.items() if value is not None}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k[:1] != "_"}


class ContextFilter(logging.Filter):
    """Copy the context's batch id and table onto records that don't carry their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_context().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        known = [f"{key}={getattr(record, key)}" for key in _CONTEXT_FIELDS if _has(record, key)]
        record.context = f" [{' '.join(known)}]" if known else ""
        return True


def _has(record: logging.LogRecord, key: str) -> bool:
    return getattr(record, key, None) is not None


class RedactionFilter(logging.Filter):
    """Mask credentials in a record before it is formatted: message, exception, extras.

    The message is rendered (``msg % args``) and masked once, so a password passed as an argument
    is caught too; the exception text is rendered and masked into ``exc_text``, which formatters
    use instead of formatting the exception again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_icefleet_redacted", False):
            return True  # a second handler sees the same record
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, masked
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact_secrets(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_secrets(record.stack_info)
        for key, value in _extras(record).items():
            if key in _CONTEXT_FIELDS:
                continue
            if is_secret_name(key) and value not in (None, ""):
                setattr(record, key, REDACTED)
            elif isinstance(value, str):
                setattr(record, key, redact_secrets(value))
        record._icefleet_redacted = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, ``batch_id`` and
    ``table`` when known, ``process``, ``exc`` for exceptions, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_FIELDS:
            if _has(record, key):
                out[key] = getattr(record, key)
        out["process"] = record.process
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        return orjson.dumps(out, default=repr, option=orjson.OPT_NON_STR_KEYS).decode("utf-8")


def _formatter(fmt: str) -> logging.Formatter:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def instrument_handler(handler: logging.Handler, fmt: str | None = None) -> logging.Handler:
    """Add context and redaction to a handler; with ``fmt``, also set its formatter."""
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())
        handler.addFilter(RedactionFilter())
    if fmt is not None:
        handler.setFormatter(_formatter(fmt))
    return handler


class _IcefleetHandler(logging.StreamHandler[TextIO]):
    """The root handler :func:`configure_logging` installs."""


def configure_logging(
    fmt: str = "text", level: str | int = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send every record to ``stream`` (stderr) as JSON or text lines, with context and
    redaction, through one handler on the root logger that replaces any others (like
    ``logging.basicConfig(force=True)``): a process entry point owns its logging."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _IcefleetHandler):
            old.flush()
    handler = instrument_handler(_IcefleetHandler(stream or sys.stderr), fmt)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
