"""Settings: typed, from ICEFLEET_* variables, errors that name the variable and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import Route, load_settings

pytestmark = pytest.mark.unit


def test_defaults_with_nothing_configured() -> None:
    # Given an environment without ICEFLEET_* variables
    # When settings are loaded
    settings = load_settings({})
    # Then the embedded defaults apply
    assert settings.home == Path(".icefleet")
    assert settings.catalog_name is None
    assert settings.schema_mode == "evolve"
    assert settings.commit_interval_ms == 1_000


def test_values_are_parsed_and_typed() -> None:
    # Given variables for several settings
    env = {
        "ICEFLEET_HOME": "/tmp/x",
        "ICEFLEET_COMMIT_INTERVAL_MS": "250",
        "ICEFLEET_ROUTES": "com.github.*=github.events, *.order.*=shop.orders",
        "ICEFLEET_SCHEMA_MODES": "shop.orders=strict",
        "ICEFLEET_LOCK_WAIT_S": "2.5",
        "ICEFLEET_COMPRESSION": "SNAPPY",
    }
    # When loaded
    settings = load_settings(env)
    # Then each is typed
    assert settings.home == Path("/tmp/x")
    assert settings.commit_interval_ms == 250
    assert settings.routes == (
        Route("com.github.*", "github.events"),
        Route("*.order.*", "shop.orders"),
    )
    assert settings.mode_for("shop.orders") == "strict"
    assert settings.mode_for("events.push") == "evolve"
    assert settings.lock_wait_s == 2.5
    assert settings.compression == "snappy"


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("ICEFLEET_COMMIT_INTERVAL_MS", "soon", "positive whole number"),
        ("ICEFLEET_COMMIT_INTERVAL_MS", "-5", "positive whole number"),
        ("ICEFLEET_MAX_EVENT_BYTES", "0", "positive whole number"),
        ("ICEFLEET_SCHEMA_MODE", "loose", "one of evolve, strict, raw"),
        ("ICEFLEET_COMPRESSION", "brotli9", "one of zstd"),
        ("ICEFLEET_NAMESPACE", "../etc", "lowercase name"),
        ("ICEFLEET_ROUTES", "com.github.*", "PATTERN=namespace.table"),
        ("ICEFLEET_ROUTES", "x=../../etc.passwd", "namespace.table"),
        ("ICEFLEET_SCHEMA_MODES", "events.push=lenient", "MODE one of"),
        ("ICEFLEET_REDIS_URL", "http://localhost", "Redis URL"),
        ("ICEFLEET_REDIS_URL", "redis://127.0.0.1:notaport/0", "port is not a number"),
        ("ICEFLEET_REDIS_URL", "redis://127.0.0.1:0/0", "port is not a number"),
        ("ICEFLEET_LOCK_WAIT_S", "never", "positive number of seconds"),
        ("ICEFLEET_HOME", "  ", "non-empty"),
        ("ICEFLEET_LOG_LEVEL", "chatty", "one of debug"),
    ],
)
def test_invalid_value_names_variable_and_fix(variable: str, value: str, accepts: str) -> None:
    # Given one invalid variable
    # When settings are loaded
    with pytest.raises(ConfigError) as raised:
        load_settings({variable: value})
    # Then the error names the variable and says what it accepts
    assert raised.value.variable == variable
    assert variable in str(raised.value)
    assert accepts in str(raised.value)


def test_secret_never_in_repr_or_error() -> None:
    # Given a Redis URL with a password
    settings = load_settings({"ICEFLEET_REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0"})
    # Then the repr hides it
    assert "hunter2" not in repr(settings)
    assert "***" in repr(settings)
    # And an invalid secret value is redacted in the error too
    with pytest.raises(ConfigError) as raised:
        load_settings({"ICEFLEET_REDIS_URL": "http://user:hunter2@host"})
    assert "hunter2" not in str(raised.value)
    # And so is one whose port is malformed (urllib raises on reading such a port)
    with pytest.raises(ConfigError) as raised:
        load_settings({"ICEFLEET_REDIS_URL": "redis://:hunter2@127.0.0.1:notaport/0"})
    assert "hunter2" not in str(raised.value)
    assert "redis://:***@127.0.0.1:notaport/0" in str(raised.value)


def test_unknown_variable_is_ignored_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Given a misspelt variable
    # When loaded
    settings = load_settings({"ICEFLEET_COMMIT_INTERVL_MS": "5"})
    # Then it is reported and the default stays
    assert settings.commit_interval_ms == 1_000
    assert "ICEFLEET_COMMIT_INTERVL_MS" in caplog.text


def test_commit_bytes_below_batch_bytes_is_refused() -> None:
    with pytest.raises(ConfigError, match="ICEFLEET_COMMIT_MAX_BYTES"):
        load_settings({"ICEFLEET_COMMIT_MAX_BYTES": "10", "ICEFLEET_BATCH_MAX_BYTES": "100"})


def test_integrity_settings() -> None:
    from common.settings import load_settings

    settings = load_settings(
        {
            "ICEFLEET_PAGE_CHECKSUMS": "off",
            "ICEFLEET_S3_CHECKSUM": "OFF",
            "ICEFLEET_VERIFY_INTERVAL": "1h",
            "ICEFLEET_VERIFY_SAMPLE_FILES": "50",
        }
    )
    assert (settings.page_checksums, settings.s3_checksum) == (False, "off")
    assert (settings.verify_interval_s, settings.verify_sample_files) == (3600.0, 50)
    defaults = load_settings({})
    assert (defaults.page_checksums, defaults.s3_checksum) == (True, "crc32c")
    assert load_settings({"ICEFLEET_PAGE_CHECKSUMS": "yes"}).page_checksums
    with pytest.raises(ConfigError, match=r"ICEFLEET_PAGE_CHECKSUMS.*on or off"):
        load_settings({"ICEFLEET_PAGE_CHECKSUMS": "maybe"})
