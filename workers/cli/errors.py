"""How every ``icefleet`` command fails: one readable line on stderr and exit 1.

Exit codes (docs/cli.md): 0 success, 1 a failure (Redis or the catalog unusable, a table that
does not exist, a file that cannot be read, events refused, a query that fails...), 2 a usage
error (click: an unknown option, a bad value), 130 interrupted (``demo``).

The expected failures of the libraries underneath (redis-py, kombu, pyiceberg, SQLAlchemy) are
turned into that one line too, with every URL password redacted: a traceback is for bugs.

A module of its own, importing nothing from ``workers.cli.main``, so the command modules that
``workers/cli/main.py`` registers (``workers/cli/maintenance.py``, ...) can use it without importing
``workers.cli.main`` again under ``python -m workers.cli.main``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from common.errors import IcefleetError, TableNotFoundError
from common.redaction import redact_text

console = Console(stderr=True)


def one_line(text: str) -> str:
    """``text`` on one line (driver messages span several), URL passwords redacted."""
    return " ".join(redact_text(text).split())


def fail(message: str, code: int = 1, *, keep_lines: bool = False) -> NoReturn:
    """Print ``error: <message>`` (markup escaped, on one line unless ``keep_lines``) on stderr
    and exit with ``code``."""
    text = redact_text(message) if keep_lines else one_line(message)
    console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def describe(exc: BaseException) -> str:
    """The one line to show for an expected failure of a library underneath."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    if isinstance(exc, NoSuchTableError | NoSuchNamespaceError):
        # pyiceberg says "Table does not exist: events.x" (or names the namespace)
        name = str(exc).rsplit(":", 1)[-1].strip() or "?"
        return str(TableNotFoundError(name))
    if isinstance(exc, IcefleetError):
        return str(exc)
    kind = type(exc).__module__.split(".", 1)[0]
    what = {"redis": "Redis", "kombu": "Redis (broker)", "sqlalchemy": "the catalog database"}
    return f"{what[kind]}: {exc}" if kind in what else str(exc)


def expected() -> tuple[type[BaseException], ...]:
    """The exception types that mean "this cannot be done now", not "icefleet has a bug"."""
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
    from sqlalchemy.exc import SQLAlchemyError

    return (
        IcefleetError,
        redis.RedisError,
        KombuOperationalError,
        NoSuchTableError,
        NoSuchNamespaceError,
        SQLAlchemyError,
    )


@contextmanager
def errors(*also: type[Exception]) -> Iterator[None]:
    """Turn the expected failures (and exceptions of the types in ``also``) into one readable
    line and exit 1."""
    caught = (*expected(), *also)
    try:
        yield
    except caught as exc:
        fail(describe(exc))
