"""Redis replies as Python values: clients may be made with or without ``decode_responses``."""

from __future__ import annotations


def as_text(value: object) -> str:
    """A key, member or field as text, whether the client returned bytes or str."""
    return value.decode() if isinstance(value, bytes) else str(value)
