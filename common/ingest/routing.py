"""CloudEvent ``type`` → Iceberg table identifier.

Identifiers are the only thing an event can say about *where* it lands, so they are held to a
strict pattern: lowercase ASCII letters, digits and ``_``, at most 63 characters, exactly two
parts (namespace and table). Nothing with ``/``, ``..``, ``%``, whitespace or non-ASCII passes,
so an identifier can never become a path outside the warehouse.

Default rule (design.md §4): namespace ``events`` (``ICEFLEET_NAMESPACE``), table name from the
last segment of the type, normalised to ``[a-z0-9_]``. ``com.github.pull_request`` →
``events.pull_request``. Configured rules (``ICEFLEET_ROUTES``) are tried first, in order.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache

from common.errors import InvalidIdentifierError
from common.settings import Route

IDENTIFIER_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
MAX_IDENTIFIER_CHARS = 63
FALLBACK_TABLE = "unrouted"
_SEGMENT_SPLIT = re.compile(r"[./:#]+")
_NOT_IDENT = re.compile(r"[^a-z0-9_]+")


@dataclass(frozen=True, order=True)
class TableName:
    """A validated ``namespace.table`` identifier."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        validate_identifier(self.namespace)
        validate_identifier(self.name)

    def __str__(self) -> str:
        return f"{self.namespace}.{self.name}"

    @property
    def parts(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @classmethod
    def parse(cls, text: str) -> TableName:
        """Parse ``namespace.table``; raises :class:`InvalidIdentifierError` on anything else."""
        if not isinstance(text, str):
            raise InvalidIdentifierError(repr(text), "a table name must be a string")
        parts = text.split(".")
        if len(parts) != 2:
            raise InvalidIdentifierError(text, "expected exactly namespace.table")
        return cls(parts[0], parts[1])


def validate_identifier(name: str) -> str:
    """Return ``name`` if it is a safe identifier part, else raise :class:`InvalidIdentifierError`."""
    if not isinstance(name, str) or not IDENTIFIER_PATTERN.match(name):
        raise InvalidIdentifierError(
            str(name),
            "must be lowercase ASCII letters, digits or _, 1-63 characters, not starting with a digit",
        )
    return name


def normalise_segment(segment: str) -> str:
    """Make a safe identifier out of arbitrary text (a type segment), or ``""`` if nothing is left."""
    text = _NOT_IDENT.sub("_", segment.lower()).strip("_")
    text = re.sub(r"_+", "_", text)[:MAX_IDENTIFIER_CHARS]
    if text and text[0].isdigit():
        text = ("t_" + text)[:MAX_IDENTIFIER_CHARS]
    return text.rstrip("_")


#: Where ``ICEFLEET_UNROUTED=dead-letter`` routes a type no rule matches: not a table, the
#: writer dead-letters its events (a namespace icefleet never creates tables in).
DEAD_LETTER_ROUTE = TableName("icefleet_unrouted", "dead_letter")
BY_TYPE = "by-type"
DEAD_LETTER = "dead-letter"


class Router:
    """Maps event types to tables; results are cached per type (a stream has few types).

    ``unrouted`` says where a type no rule matches goes: ``by-type`` (a table named after it,
    the default), ``dead-letter`` (:data:`DEAD_LETTER_ROUTE`), or one ``namespace.table``: with
    either of the last two, clients cannot create tables by inventing types."""

    def __init__(
        self, routes: tuple[Route, ...] = (), namespace: str = "events", unrouted: str = BY_TYPE
    ) -> None:
        self._routes = tuple((route.pattern, TableName.parse(route.table)) for route in routes)
        self._namespace = validate_identifier(namespace)
        self._unrouted = (
            None
            if unrouted == BY_TYPE
            else DEAD_LETTER_ROUTE
            if unrouted == DEAD_LETTER
            else TableName.parse(unrouted)
        )
        self.table_for = lru_cache(maxsize=4096)(self._table_for)

    def _table_for(self, event_type: str) -> TableName:
        for pattern, table in self._routes:
            if fnmatch.fnmatchcase(event_type, pattern):
                return table
        if self._unrouted is not None:
            return self._unrouted
        segments = [s for s in _SEGMENT_SPLIT.split(event_type) if normalise_segment(s)]
        name = normalise_segment(segments[-1]) if segments else ""
        return TableName(self._namespace, name or FALLBACK_TABLE)
