"""Keep credentials out of reprs, logs and error messages."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"

# Property names that hold secrets in pyiceberg, boto3, redis and SQLAlchemy configuration.
_SECRET_NAME = re.compile(
    r"(secret|token|password|passwd|credential|session|private|(^|[._-])key$)", re.I
)
_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I
)


def is_secret_name(name: str) -> bool:
    """True when a configuration key names a credential (``s3.secret-access-key``, ``token``...)."""
    return bool(_SECRET_NAME.search(name))


def redact_url(url: str) -> str:
    """Replace the password of a URL (``redis://:pw@host``) with ``***``; other parts stay."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number (a malformed URL)
    except ValueError:
        return _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{REDACTED}@", url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if port is not None:
        host = f"{host}:{port}"
    netloc = f"{user}:{REDACTED}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_text(text: str) -> str:
    """Redact every URL password that appears anywhere in free text (an exception message)."""
    return _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{REDACTED}@", text)


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a property mapping with secret values replaced and URL passwords hidden."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if is_secret_name(str(name)):
            out[name] = REDACTED
        elif isinstance(value, str):
            out[name] = redact_url(value)
        else:
            out[name] = value
    return out
