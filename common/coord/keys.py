"""Every Redis key icefleet uses, in one place, under one prefix.

Per-table keys take the table identifier as the caller spells it (``"events.push"``) and append it
verbatim. Redis keys are binary-safe and no hash tags (``{...}``) are used, so no character in a
table name can change which key is meant or break a key; each kind of key has its own fixed infix
(``lock:``, ``pending:``, ...), none a prefix of another, so two kinds never collide.

Per-table keys and the global ``pending-tables`` set are touched together by single Lua scripts,
which Redis Cluster would refuse (different hash slots): icefleet targets a single Redis primary.
"""

from __future__ import annotations

from common.errors import InvalidIdentifierError

PREFIX = "icefleet:"


def _table_key(kind: str, table: str) -> str:
    if not table:
        raise InvalidIdentifierError(table, "a table identifier cannot be empty")
    return f"{PREFIX}{kind}:{table}"


def lock(table: str) -> str:
    """The table's commit lock (string: the owner's random token, with a TTL)."""
    return _table_key("lock", table)


def pending(table: str) -> str:
    """Batches written but not committed yet (hash: batch id → entry JSON)."""
    return _table_key("pending", table)


def pending_tables() -> str:
    """Tables that have at least one pending batch (set of table identifiers)."""
    return f"{PREFIX}pending-tables"


def committed(table: str) -> str:
    """Dedup memory of committed batches (sorted set: batch id → commit time in ms)."""
    return _table_key("committed", table)


def prepared(table: str) -> str:
    """The prepared-commit record of the commit in progress (string: JSON)."""
    return _table_key("prepared", table)


def dead_letters() -> str:
    """Events that could not be landed, with the reason (stream)."""
    return f"{PREFIX}dead-letters"


def nudge(table: str) -> str:
    """The id of the commit task on its way for the table (string with a TTL): dedupes nudges."""
    return _table_key("nudge", table)


def outstanding() -> str:
    """Batches enqueued but not written yet (sorted set: batch id → first enqueue time in ms)."""
    return f"{PREFIX}outstanding"


def budget_bytes() -> str:
    """Bytes of packed payload of the outstanding batches (string: a counter;
    common/coord/budget.py)."""
    return f"{PREFIX}budget:bytes"


def budget_sizes() -> str:
    """The size charged for each outstanding batch (hash: batch id -> bytes), so it is refunded
    exactly once when the batch is written (common/coord/budget.py)."""
    return f"{PREFIX}budget:sizes"


def deliveries() -> str:
    """How often each outstanding batch's write task has started (hash: batch id → count)."""
    return f"{PREFIX}deliveries"


def payload(batch_id: str) -> str:
    """A copy of an outstanding batch's write-task arguments, kept until the batch is written
    (string: JSON), so a message lost on its way can be sent again (common/coord/resend.py)."""
    return f"{PREFIX}payload:{batch_id}"


def resent(batch_id: str) -> str:
    """Marks a batch sent again by the sweep, for a while (string with a TTL)."""
    return f"{PREFIX}resent:{batch_id}"


def split(batch_id: str) -> str:
    """Where a writer recorded the point at which it split the batch (string: the offset, with
    the dedup window as TTL; common/write/partial.py)."""
    return f"{PREFIX}split:{batch_id}"


def replays() -> str:
    """Dead letters assigned to a replay batch (hash: dead-letter id → batch id, and
    ``batch:<id>`` → the batch's members; common/ingest/replay.py)."""
    return f"{PREFIX}replays"


def replayed(digest: str) -> str:
    """The dead-letter id replaying an input (string), by a digest of its batch, position and
    bytes: a dead letter stored twice is replayed once."""
    return f"{PREFIX}replayed:{digest}"


def content(batch_id: str) -> str:
    """The content a batch id is bound to (string: its content digest, and the sizes of its
    parts when the producer cut it; the dedup window as TTL; common/coord/bindings.py)."""
    return f"{PREFIX}content:{batch_id}"


def claims(table: str, bucket: int) -> str:
    """Event identities that landed or are pending in a table, claimed in one time bucket (hash:
    identity digest → owner, position and bytes digest; common/coord/claims.py)."""
    return f"{claims_prefix(table)}{bucket}"


def claims_prefix(table: str) -> str:
    """The claims buckets' names without the bucket number (their Lua script appends it)."""
    return _table_key("claims", table) + "@"


def duplicates() -> str:
    """Duplicate events counted per table (hash: ``<table>:dropped`` and ``<table>:conflicting``
    → count; common/coord/claims.py)."""
    return f"{PREFIX}duplicates"


def canary_last() -> str:
    """The canary's last result (string: JSON; workers/tasks/canary.py, read by the metrics)."""
    return f"{PREFIX}canary:last"


def quarantine(table: str) -> str:
    """Quarantined data files of a table (hash: original path → record JSON;
    common/maintenance/quarantine.py). The same records live beside the copies, for good."""
    return _table_key("quarantine", table)


def verify_cursor() -> str:
    """Where the sampled validation goes on (hash: ``table`` → the table it is in, and each
    table → the last file it checked there; common/maintenance/sampling.py)."""
    return f"{PREFIX}verify:cursor"


def verify_last() -> str:
    """The last sampled validation run (string: JSON; read by the metrics and ``status``)."""
    return f"{PREFIX}verify:last"


def verify_failures() -> str:
    """Bad files found by sampled validation since the beginning (integer; a Prometheus counter)."""
    return f"{PREFIX}verify:failures"
