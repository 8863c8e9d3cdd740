"""How every ``icefleet`` command fails: one readable line on stderr and a non-zero exit.

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

from common.errors import IcefleetError

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` (markup escaped) on stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


@contextmanager
def errors(*also: type[Exception]) -> Iterator[None]:
    """Turn icefleet's own errors (and those of the types in ``also``) into one readable line
    and exit 1."""
    caught: tuple[type[Exception], ...] = (IcefleetError, *also)
    try:
        yield
    except caught as exc:
        fail(str(exc))
