"""The one error hierarchy of icefleet.

Every error raised on purpose by icefleet derives from :class:`IcefleetError`. Errors that are safe
to retry (:class:`RetryableError`) are kept apart from errors whose outcome is unknown
(:class:`CommitStateUnknownError`), as pyiceberg does with ``CommitFailedException`` and
``CommitStateUnknownException``: the first means "nothing happened, try again", the second means
"something may have happened, look at the table before doing anything".

Messages never contain credentials: where a URL is mentioned it goes through
:func:`common.redaction.redact_url` first.
"""

from __future__ import annotations


class IcefleetError(Exception):
    """Root of every error icefleet raises on purpose."""


# --- configuration -------------------------------------------------------------------------------


class ConfigError(IcefleetError):
    """Raised when a configuration value is missing or invalid.

    Carries the environment variable's name, the offending value (already redacted when secret)
    and a sentence saying what the variable accepts, so the message tells the operator the fix.
    """

    def __init__(self, variable: str, value: str | None, accepts: str) -> None:
        self.variable = variable
        self.value = value
        self.accepts = accepts
        shown = "<unset>" if value is None else repr(value)
        super().__init__(f"{variable}={shown} is invalid: {variable} accepts {accepts}")


class MissingDependencyError(IcefleetError):
    """Raised when an optional component is used but not installed or not on PATH."""

    def __init__(self, what: str, hint: str) -> None:
        self.what = what
        self.hint = hint
        super().__init__(f"{what} is not available: {hint}")


# --- input ---------------------------------------------------------------------------------------


class InvalidEventError(IcefleetError):
    """Raised when one event breaks the CloudEvents 1.0 rules or icefleet's limits.

    ``attribute`` names the context attribute at fault (``"id"``, ``"time"``, ...), or ``None``
    when the input is not an event at all (malformed JSON, bad UTF-8, too large).
    """

    def __init__(self, reason: str, attribute: str | None = None) -> None:
        self.reason = reason
        self.attribute = attribute
        super().__init__(reason)


class InvalidIdentifierError(IcefleetError, ValueError):
    """Raised when a namespace or table name does not match icefleet's strict identifier pattern.

    The pattern leaves no room for path separators, dots, ``..`` or non-ASCII characters, so an
    identifier can never point outside the warehouse.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"invalid identifier {name[:80]!r}: {reason}")


class InvalidBatchIdError(IcefleetError, ValueError):
    """Raised when a batch id (a producer's idempotency key) cannot be used; ``reason`` says why.

    A ``ValueError`` too, so callers that refused a bad id by catching ``ValueError`` still do.
    """

    def __init__(self, batch_id: str, reason: str) -> None:
        self.batch_id = batch_id
        self.reason = reason
        super().__init__(f"invalid batch id {batch_id[:80]!r}: {reason}")


class BatchConflictError(IcefleetError):
    """Raised when a batch id already names other content (another payload or table).

    A batch id is the idempotency key of its content (:mod:`common.coord.bindings`): reusing it for
    other events would have them skipped as a duplicate. The producer raises it, the gateway
    answers 409 with it, ``icefleet send`` exits non-zero with it.
    """

    def __init__(self, batch_id: str, reason: str) -> None:
        self.batch_id = batch_id
        self.reason = reason
        super().__init__(f"batch id {batch_id[:200]!r} is taken: {reason}")


class SchemaConflictError(IcefleetError):
    """Raised in ``strict`` mode when an event does not fit the table's schema."""

    def __init__(self, table: str, field: str, reason: str) -> None:
        self.table = table
        self.field = field
        self.reason = reason
        super().__init__(f"{table}: field {field!r} {reason}")


# --- storage and catalog -------------------------------------------------------------------------


class RetryableError(IcefleetError):
    """Raised when an operation failed in a way that is safe to try again (nothing was applied)."""


class StorageError(IcefleetError):
    """Raised when the warehouse cannot be read or written."""


class TransientStorageError(StorageError, RetryableError):
    """Raised when a storage call failed for a reason that may pass (connection, 5xx, throttling)."""


class MissingDataFileError(StorageError):
    """Raised when a data file about to be committed is absent or not the size its DataFile says."""

    def __init__(self, path: str, expected_bytes: int, actual_bytes: int | None) -> None:
        self.path = path
        self.expected_bytes = expected_bytes
        self.actual_bytes = actual_bytes
        found = "missing" if actual_bytes is None else f"{actual_bytes} bytes"
        super().__init__(f"data file {path} expected {expected_bytes} bytes, found {found}")


class CorruptDataFileError(StorageError):
    """Raised when a data file's bytes fail a check: a page checksum (CRC) that does not match,
    a page that does not decode, or an object store's checksum that disagrees with ours."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"data file {path} is corrupt: {detail}")


class CatalogError(IcefleetError):
    """Raised when the catalog cannot be reached or refuses an operation."""


class CommitConflictError(RetryableError):
    """Raised when a commit was based on stale table metadata; refresh and try again."""

    def __init__(self, table: str, detail: str) -> None:
        self.table = table
        super().__init__(f"commit to {table} conflicted: {detail}")


class CommitStateUnknownError(IcefleetError):
    """Raised when a commit's outcome is unknown (timeout, 5xx): read the watermark to decide."""

    def __init__(self, table: str, detail: str) -> None:
        self.table = table
        super().__init__(f"outcome of the commit to {table} is unknown: {detail}")


class CommitVerificationError(IcefleetError):
    """Raised when a commit found landed is not the one prepared: the snapshot carrying the
    prepared commit-seq names other batches (another fleet on the same table, a Redis restored
    from an old copy). The table's pending batches are left as they are for an operator."""

    def __init__(self, table: str, seq: int, detail: str) -> None:
        self.table = table
        self.seq = seq
        super().__init__(
            f"{table}: commit seq {seq} landed with other batches than prepared ({detail}); "
            "not clearing pending: the table's commits stop until an operator resolves it "
            "(see docs/exactly-once.md, 'Recovery')"
        )


class ConcurrentModificationError(IcefleetError):
    """Raised when a file to remove or replace is no longer live in the table."""

    def __init__(self, table: str, paths: list[str]) -> None:
        self.table = table
        self.paths = paths
        super().__init__(f"{table}: {len(paths)} file(s) are no longer live, e.g. {paths[:1]}")


class RetriesExhaustedError(IcefleetError):
    """Raised after the last attempt of a retried operation failed; nothing was dropped."""

    def __init__(self, operation: str, attempts: int, last_error: BaseException) -> None:
        self.operation = operation
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(
            f"{operation} failed after {attempts} attempts; last error: "
            f"{type(last_error).__name__}: {last_error}"
        )


# --- coordination --------------------------------------------------------------------------------


class LockError(IcefleetError):
    """Base of the table-lock errors."""


class LockNotAcquiredError(LockError, RetryableError):
    """Raised when a table lock could not be had within the wait time."""

    def __init__(self, name: str, waited_s: float) -> None:
        self.name = name
        self.waited_s = waited_s
        super().__init__(f"lock {name} not acquired within {waited_s:.1f}s (held by another)")


class LockLostError(LockError):
    """Raised when a lock expired or was taken over while its owner still worked under it."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"lock {name} was lost (expired or taken over) before it was released")


class OverloadedError(RetryableError):
    """Raised when the fleet's budget of work not yet written is used up: nothing was enqueued.

    ``retry_after_s`` is the suggested delay before trying again (the gateway's ``Retry-After``);
    the figures say how full the budget is (``common/coord/budget.py``).
    """

    def __init__(
        self,
        retry_after_s: int,
        *,
        in_use_bytes: int,
        in_use_batches: int,
        max_bytes: int,
        max_batches: int,
    ) -> None:
        self.retry_after_s = retry_after_s
        self.in_use_bytes = in_use_bytes
        self.in_use_batches = in_use_batches
        self.max_bytes = max_bytes
        self.max_batches = max_batches
        super().__init__(
            f"the fleet is over its budget of work not yet written ({in_use_batches} of "
            f"{max_batches} batches, {in_use_bytes} of {max_bytes} bytes): nothing was enqueued; "
            f"try again in {retry_after_s}s"
        )


class PayloadEncodingError(IcefleetError):
    """A write task's payload is not in the encoding it says (:mod:`common.ingest.payloads`)."""


# --- the command line ----------------------------------------------------------------------------


class RedisUnavailableError(IcefleetError):
    """Raised when the Redis a command needs cannot be used: not answering, or refusing our
    credentials. ``url`` is already redacted; ``origin`` says where the URL came from."""

    def __init__(self, url: str, origin: str, problem: str, hint: str) -> None:
        self.url = url
        self.origin = origin
        self.problem = problem
        super().__init__(f"Redis at {url} ({origin}) {problem}: {hint}")


class StaleFleetRecordError(IcefleetError):
    """Raised when the local fleet a record under ``ICEFLEET_HOME`` describes is gone: its record
    is removed, and the command refuses to fall back to the default Redis in its place."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        super().__init__(
            f"the local fleet recorded in {path} is gone ({why}); the stale record was removed. "
            "Start it again with `icefleet up`, or set ICEFLEET_REDIS_URL"
        )


class TableNotFoundError(IcefleetError):
    """Raised when a command names a table the catalog does not have."""

    def __init__(self, table: str) -> None:
        self.table = table
        super().__init__(f"no table {table} in the catalog (`icefleet tables` lists them)")


class QueryError(IcefleetError):
    """Raised when the query engine refuses or fails a SQL query; the message is its reason."""
