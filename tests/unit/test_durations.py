"""Durations as operators write them: 7d, 12h, 0s, 1d12h."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.durations import format_duration, parse_duration, parse_duration_s
from common.errors import ConfigError
from common.settings import load_settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * 86_400),
        ("12h", 12 * 3_600),
        ("0s", 0),
        ("30m", 1_800),
        ("45s", 45),
        ("1w", 7 * 86_400),
        ("1d12h", 36 * 3_600),
        ("1h 30m", 5_400),
        ("250ms", 0.25),
        ("1.5h", 5_400),
        ("90", 90),
        (" 3D ", 3 * 86_400),
    ],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "7d-", "1h30", "h1", "7 days", "1e3s"])
def test_nonsense_is_refused_with_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="a duration such as 7d"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**8))
def test_format_reads_back(seconds: int) -> None:
    assert parse_duration_s(format_duration(seconds)) == seconds


def test_format_examples() -> None:
    assert format_duration(timedelta(days=7)) == "7d"
    assert format_duration(0) == "0s"
    assert format_duration(3_661) == "1h1m1s"


def test_settings_take_durations_and_maintenance_values() -> None:
    # Given maintenance variables
    settings = load_settings(
        {
            "ICEFLEET_ORPHAN_MIN_AGE": "2d",
            "ICEFLEET_EXPIRE_OLDER_THAN": "0s",
            "ICEFLEET_EXPIRE_RETAIN_LAST": "7",
            "ICEFLEET_COMPACT_TARGET_FILE_SIZE_BYTES": "67108864",
            "ICEFLEET_COMPACT_SMALL_FILE_FRACTION": "0.5",
            "ICEFLEET_COMPACT_MIN_FILES": "3",
            "ICEFLEET_MAINTENANCE_EXPIRE_INTERVAL": "1m",
        }
    )
    # Then they are typed
    assert settings.orphan_min_age_s == 2 * 86_400
    assert settings.expire_older_than_s == 0 and settings.expire_retain_last == 7
    assert settings.compact_target_file_size_bytes == 64 * 1_048_576
    assert settings.compact_small_file_fraction == 0.5 and settings.compact_min_files == 3
    assert settings.maintenance_expire_interval_s == 60
    # And the defaults are the documented ones
    defaults = load_settings({})
    assert defaults.orphan_min_age_s == 3 * 86_400
    assert defaults.compact_target_file_size_bytes == 128 * 1_048_576


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("ICEFLEET_ORPHAN_MIN_AGE", "soon", "a duration such as 7d"),
        ("ICEFLEET_MAINTENANCE_COMPACT_INTERVAL", "0s", "a positive duration"),
        ("ICEFLEET_COMPACT_SMALL_FILE_FRACTION", "1.5", "a fraction above 0"),
        ("ICEFLEET_COMPACT_MIN_FILES", "1", "at least 2"),
    ],
)
def test_bad_maintenance_values_name_the_variable(variable: str, value: str, accepts: str) -> None:
    with pytest.raises(ConfigError, match=accepts) as raised:
        load_settings({variable: value})
    assert variable in str(raised.value)
