"""Keep credentials out of reprs, logs and error messages.

:func:`redact_url` is the one path every URL icefleet prints takes: the password of its user
part (``redis://:pw@host``) and the value of every query parameter whose name says it is a
secret (``?password=``, ``?token=``, ``?sslkey=``...) become ``***``. :func:`redact_text` finds
the URLs in free text (an exception's message) and sends each through it."""

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
# A URL in free text: up to whitespace, a quote or a closing bracket (how messages delimit them)
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>()\[\]]+", re.I)
_QUERY_SECRET = re.compile(r"(?P<key>[^&=?#\s]+)=(?P<value>[^&#\s]*)")


def is_secret_name(name: str) -> bool:
    """True when a configuration key names a credential (``s3.secret-access-key``, ``token``...)."""
    return bool(_SECRET_NAME.search(name))


def redact_url(url: str) -> str:
    """``url`` with its password and the values of its secret query parameters as ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL (a bad port...): mask what looks like secrets
        return _redact_query(_URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{REDACTED}@", url))
    netloc = parts.netloc
    if password is not None:
        user = parts.username or ""
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:{REDACTED}@{host}"
    query = _redact_query(parts.query) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_query(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        if is_secret_name(match.group("key")) or _is_password_param(match.group("key")):
            return f"{match.group('key')}={REDACTED}"
        return match.group(0)

    return _QUERY_SECRET.sub(mask, text)


def _is_password_param(name: str) -> bool:
    # short forms drivers accept besides the names _SECRET_NAME knows (psycopg's "pass" aside)
    return name.lower() in ("pass", "pwd", "sslpassword", "auth")


def redact_text(text: str) -> str:
    """Redact every URL that appears anywhere in free text (an exception message)."""
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


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
