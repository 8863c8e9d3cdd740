"""Structured logs: JSON lines with the batch id and table, credentials masked everywhere."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from common.observe.logs import (
    configure_logging,
    current_context,
    instrument_handler,
    log_context,
    redact_secrets,
)
from common.settings import load_settings

pytestmark = pytest.mark.unit


@pytest.fixture
def logs() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A JSON-configured root logger writing to a buffer; the root's handlers restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("json", "DEBUG", stream)
    yield logging.getLogger("icefleet.test"), stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_batch_id_and_table_from_the_context(
    logs: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logs

    # When records are logged inside nested contexts, and outside them
    with log_context(batch_id="batch-1", table="events.order"):
        log.info("writing %d events", 3, extra={"files": 2})
        with log_context(table="events.click"):
            log.warning("switched table")
        assert current_context() == {"batch_id": "batch-1", "table": "events.order"}
    log.info("outside", extra={"table": "events.explicit"})

    # Then each JSON line says what the context said at the time (an explicit extra wins)
    first, second, third = records(stream)
    assert first["message"] == "writing 3 events"
    assert (first["level"], first["logger"]) == ("INFO", "icefleet.test")
    assert (first["batch_id"], first["table"], first["files"]) == ("batch-1", "events.order", 2)
    assert (second["batch_id"], second["table"]) == ("batch-1", "events.click")
    assert "batch_id" not in third and third["table"] == "events.explicit"
    assert first["ts"].endswith("+00:00") and isinstance(first["process"], int)
    assert current_context() == {}


def test_credentials_are_masked_in_messages_arguments_extras_and_tracebacks(
    logs: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logs

    # When secrets reach the log in every way they can
    log.info("connecting to %s", "redis://:hunter2@redis:6379/0")
    log.info("headers: Authorization: Bearer abc.def-ghi")
    log.info('config {"s3.secret-access-key": "AKIA-SECRET", "region": "auto"} password=pw1')
    log.info("catalog", extra={"token": "t0ken", "uri": "postgresql://u:pg-pw@db/x"})
    try:
        raise ConnectionError("cannot reach postgresql+psycopg2://icefleet:pg-pw2@db:5432/x")
    except ConnectionError:
        log.exception("commit failed")

    # Then none of them is in the output, and the rest of each line is
    text = stream.getvalue()
    for secret in ("hunter2", "abc.def-ghi", "AKIA-SECRET", "pw1", "t0ken", "pg-pw", "pg-pw2"):
        assert secret not in text
    lines = records(stream)
    assert lines[0]["message"] == "connecting to redis://:***@redis:6379/0"
    assert lines[1]["message"] == "headers: Authorization: Bearer ***"
    assert '"region": "auto"' in lines[2]["message"]
    assert lines[3]["token"] == "***" and lines[3]["uri"] == "postgresql://u:***@db/x"
    assert (
        "ConnectionError: cannot reach postgresql+psycopg2://icefleet:***@db:5432/x"
        in (lines[4]["exc"])
    )


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("api_key=abc123&x=1", "api_key=***&x=1"),
        ("'password': 'p w', 'x': 1", "'password': '***', 'x': 1"),
        ("secret = two words", "secret = *** words"),  # unquoted: up to the first space
        ("Basic dXNlcjpwYXNz", "Basic ***"),
        ("nothing secret here: 42", "nothing secret here: 42"),
        ("http_token=None, password='', token=***", "http_token=None, password='', token=***"),
    ],
)
def test_redact_secrets(text: str, masked: str) -> None:
    assert redact_secrets(text) == masked


def test_text_format_shows_the_context() -> None:
    stream = io.StringIO()
    handler = instrument_handler(logging.StreamHandler(stream), "text")
    instrument_handler(handler)  # a second time adds nothing
    assert len(handler.filters) == 2
    log = logging.getLogger("icefleet.text")
    log.addHandler(handler)
    log.propagate = False
    try:
        with log_context(batch_id="b7"):
            log.warning("token=s3cr3t late")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    line = stream.getvalue()
    assert "WARNING icefleet.text [batch_id=b7]: token=*** late" in line


def test_configure_logging_replaces_root_handlers_and_rejects_unknown_formats(
    logs: tuple[logging.Logger, io.StringIO],
) -> None:
    root = logging.getLogger()
    configure_logging("text", "INFO", io.StringIO())
    assert len(root.handlers) == 1
    with pytest.raises(ValueError, match="json, text"):
        configure_logging("yaml")


def test_settings_never_show_the_http_token() -> None:
    settings = load_settings({"ICEFLEET_HTTP_TOKEN": "sup3r-s3cret", "ICEFLEET_LOG_FORMAT": "JSON"})
    assert settings.http_token == "sup3r-s3cret" and settings.log_format == "json"
    assert "sup3r-s3cret" not in repr(settings)
    assert "http_token='***'" in repr(settings)
