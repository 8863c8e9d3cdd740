"""Durations as operators write them: ``7d``, ``12h``, ``30m``, ``45s``, ``1d12h``, ``0s``.

Units: ``w`` (weeks), ``d``, ``h``, ``m`` (minutes), ``s``, ``ms``. A bare number is seconds.
Used by the maintenance commands (``--older-than 7d``) and the ``ICEFLEET_*`` policy variables.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNIT_S = {"w": 7 * 86_400.0, "d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|w|d|h|m|s)")
_ACCEPTS = "a duration such as 7d, 12h, 30m, 45s, 1d12h or 0s (units w d h m s ms)"


def parse_duration(text: str) -> timedelta:
    """The :class:`~datetime.timedelta` ``text`` spells; ValueError saying what is accepted."""
    raw = text.strip().lower().replace(" ", "")
    if not raw:
        raise ValueError(_ACCEPTS)
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if seconds < 0:
            raise ValueError(_ACCEPTS)
        return timedelta(seconds=seconds)
    total = 0.0
    position = 0
    for match in _PART.finditer(raw):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        position = match.end()
    if position != len(raw):
        raise ValueError(_ACCEPTS)
    return timedelta(seconds=total)


def parse_duration_s(text: str) -> float:
    """Seconds that ``text`` spells (see :func:`parse_duration`)."""
    return parse_duration(text).total_seconds()


def format_duration(delta: timedelta | float) -> str:
    """The shortest spelling :func:`parse_duration` reads back to the same value (whole seconds)."""
    seconds = int(delta.total_seconds() if isinstance(delta, timedelta) else delta)
    if seconds == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        size = int(_UNIT_S[unit])
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


__all__ = ["format_duration", "parse_duration", "parse_duration_s"]
