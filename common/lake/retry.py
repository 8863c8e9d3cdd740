"""Retry policies for storage and catalog calls: exponential backoff with full jitter, few attempts.

Only *transient* failures are retried, the ones that pass by themselves:

- connections refused, reset or timed out (``ConnectionError``, ``TimeoutError``, botocore's
  endpoint and read-timeout errors);
- HTTP 5xx, 429 and throttling, as pyarrow's S3 client words them in its ``OSError`` messages
  (``AWS Error SLOW_DOWN during PutObject``, ``HTTP status 503``, ``timed out``, ``curlCode: 28``)
  or as botocore reports them (``SlowDown``, ``Throttling``, ``RequestTimeout``...);
- the catalog database gone or busy: SQLAlchemy's ``OperationalError`` and ``DisconnectionError``
  (PostgreSQL restarting, SQLite ``database is locked``), unless the message says the failure is
  permanent (bad password, missing table);
- icefleet's own :class:`~common.errors.RetryableError`.

Everything else is *permanent* and raised at once, unchanged: authentication and permission
errors (``403``, ``AccessDenied``), missing objects, validation errors, bugs. Retrying those only
hides them for longer.

When the last attempt fails too, :class:`~common.errors.RetriesExhaustedError` names the
operation and the number of attempts, chained to the last error. The caller keeps its work: a
write task retries the batch later (and dead-letters it after many deliveries), a commit keeps
its prepared record; nothing is dropped.

The policies are deliberately short (seconds, not minutes): they ride out a throttled request or
a database failover inside one task. A longer outage is the task queue's business, whose retries
free the worker meanwhile.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from common.errors import LockError, RetriesExhaustedError, RetryableError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Checked first: a message that says "denied" is not retried even if it also says "503".
_PERMANENT = re.compile(
    r"ACCESS_DENIED|AccessDenied|Access Denied|HTTP status 40[0134]\b|\b40[13] Forbidden|"
    r"Forbidden|InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken|NoSuchBucket|"
    r"NoSuchKey|InvalidBucketName|MalformedXML|EntityTooLarge|"
    r"password authentication failed|authentication failed|permission denied|"
    r"no such table|does not exist|syntax error",
    re.IGNORECASE,
)
_TRANSIENT = re.compile(
    r"\b(?:500|502|503|504|429)\b|SLOW_?DOWN|Throttl|TooManyRequests|Too Many Requests|"
    r"timed? ?out|TIMEOUT|NETWORK_CONNECTION|curlCode|"
    r"Connection (?:reset|refused|aborted|closed)|Broken pipe|Could not connect|"
    r"ServiceUnavailable|SERVICE_UNAVAILABLE|Service Unavailable|InternalError|INTERNAL_FAILURE|"
    r"RequestTimeout|Temporar|try again|database is locked|database table is locked|"
    r"server closed the connection|terminating connection|connection to server|"
    r"the database system is (?:starting up|shutting down|in recovery mode)|"
    r"unable to open database file|disk I/O error",
    re.IGNORECASE,
)
# OSError subclasses that say something definite about the object, never about the network.
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_BOTOCORE_TRANSIENT = frozenset(
    (
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "HTTPClientError",
    )
)
_BOTOCORE_TRANSIENT_CODES = frozenset(
    (
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        # the store refused the bytes it received as not those we sent (a checksum that does
        # not match: changed in transit): sending them again is the cure
        "BadDigest",
        "XAmzContentChecksumMismatch",
    )
)
_REDIS_LATER = frozenset(("ConnectionError", "TimeoutError", "BusyLoadingError"))
_SQLALCHEMY_TRANSIENT = frozenset(("OperationalError", "DisconnectionError", "TimeoutError"))


def _class_names(exc: BaseException) -> set[tuple[str, str]]:
    return {(cls.__module__.split(".")[0], cls.__name__) for cls in type(exc).__mro__}


def _botocore_transient(exc: BaseException) -> bool | None:
    """True/False for botocore's errors (without importing botocore), None for anything else."""
    names = _class_names(exc)
    if not any(module == "botocore" for module, _ in names):
        return None
    if any(name in _BOTOCORE_TRANSIENT for module, name in names if module == "botocore"):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if error.get("Code") in _BOTOCORE_TRANSIENT_CODES:
            return True
        if isinstance(status, int):
            return status >= 500 or status == 429
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that may pass if the same call is simply made again."""
    if isinstance(exc, RetriesExhaustedError):
        return False  # already retried: do not multiply attempts by nesting policies
    if isinstance(exc, RetryableError):
        return True
    boto = _botocore_transient(exc)
    if boto is not None:
        return boto
    message = str(exc)
    names = _class_names(exc)
    if any(module == "sqlalchemy" and name in _SQLALCHEMY_TRANSIENT for module, name in names):
        return not _PERMANENT.search(message)
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError):  # pyarrow's S3 and local file errors carry only a message
        return not _PERMANENT.search(message) and bool(_TRANSIENT.search(message))
    return False


def is_transient_unless_locked(exc: BaseException) -> bool:
    """:func:`is_transient`, but a table lock held by another process is not retried: that
    process is already doing the work (a commit, a schema change) this call would do."""
    return is_transient(exc) and not isinstance(exc, LockError)


def worth_retrying_later(exc: BaseException) -> bool:
    """Whether a task that failed with ``exc`` may succeed when delivered again in a while.

    Wider than :func:`is_transient` (a call retried at once): an outage that outlasted a retry
    policy, a schema change that raced another process (pyiceberg's ``CommitFailedException``),
    Redis or the catalog database unreachable, any storage I/O error. The task queue's backoff
    is minutes long; a permanent error still reaches the dead letters after a few deliveries.
    """
    if isinstance(exc, RetriesExhaustedError):
        return worth_retrying_later(exc.last_error)
    if is_transient(exc) or isinstance(exc, RetryableError | OSError):
        return True
    names = _class_names(exc)
    if any(module == "redis" and name in _REDIS_LATER for module, name in names):
        return True
    if any(module == "pyiceberg" and name == "CommitFailedException" for module, name in names):
        return True
    return any(module == "sqlalchemy" and name == "OperationalError" for module, name in names)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one kind of call is retried.

    Waits are full-jitter exponential: a random pause of up to ``base_s * 2**n`` seconds before
    attempt ``n + 2``, capped at ``max_wait_s``. ``retry_on`` decides what is transient.
    """

    name: str
    attempts: int = 5
    base_s: float = 0.1
    max_wait_s: float = 5.0
    retry_on: Callable[[BaseException], bool] = is_transient
    sleep: Callable[[float], None] | None = None  # tests replace the pause

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")

    def but(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields changed, e.g. ``CATALOG.but(attempts=2)``."""
        return replace(self, **changes)

    def call(self, operation: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``, retried on transient errors.

        Raises the first permanent error unchanged, or :class:`RetriesExhaustedError` (naming
        ``operation`` and the attempts made, chained to the last error) when every attempt failed.
        """
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return fn(*args, **kwargs)

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            pause = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "%s: attempt %d of %d failed (%s: %s); retrying in %.2fs",
                operation,
                state.attempt_number,
                self.attempts,
                type(error).__name__,
                str(error)[:300],
                pause,
            )

        options: dict[str, Any] = {}
        if self.sleep is not None:
            options["sleep"] = self.sleep
        retrying = Retrying(
            retry=retry_if_exception(self.retry_on),
            wait=wait_random_exponential(multiplier=self.base_s, max=self.max_wait_s),
            stop=stop_after_attempt(self.attempts),
            before_sleep=log_retry,
            reraise=False,
            **options,
        )
        try:
            return retrying(attempt)
        except RetryError as exc:
            last = exc.last_attempt.exception() or RuntimeError("no error recorded")
            raise RetriesExhaustedError(operation, attempts, last) from last


#: Object storage (and local files): writes of data files, size checks.
STORAGE = RetryPolicy("storage", attempts=6, base_s=0.2, max_wait_s=5.0)
#: The catalog (SQL database, REST service): loading and creating tables.
CATALOG = RetryPolicy("catalog", attempts=6, base_s=0.25, max_wait_s=5.0)


def policies_for(retry_base_ms: int) -> tuple[RetryPolicy, RetryPolicy]:
    """The storage and catalog policies scaled to ``ICEFLEET_RETRY_BASE_MS``.

    The default base (100 ms) gives the constants above; tests that shrink it to a few ms get
    quick retries with the same number of attempts.
    """
    scale = retry_base_ms / 100
    return (
        STORAGE.but(
            base_s=STORAGE.base_s * scale, max_wait_s=max(STORAGE.max_wait_s * scale, 0.05)
        ),
        CATALOG.but(
            base_s=CATALOG.base_s * scale, max_wait_s=max(CATALOG.max_wait_s * scale, 0.05)
        ),
    )


def retried(policy: RetryPolicy, operation: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator form of :meth:`RetryPolicy.call`."""

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return policy.call(operation, fn, *args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", "retried")
        wrapper.__doc__ = fn.__doc__
        return wrapper

    return decorate


__all__ = ["CATALOG", "STORAGE", "RetryPolicy", "is_transient", "policies_for", "retried"]
