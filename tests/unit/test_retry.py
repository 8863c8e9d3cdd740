"""Retry policies: what is transient, backoff with jitter, and the error after the last attempt."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from common.errors import (
    CommitStateUnknownError,
    InvalidEventError,
    LockNotAcquiredError,
    RetriesExhaustedError,
    TransientStorageError,
)
from common.lake.retry import CATALOG, STORAGE, RetryPolicy, is_transient, policies_for, retried

pytestmark = pytest.mark.unit

# What pyarrow's S3 client (the AWS C++ SDK) raises, as seen against a throttling proxy.
PYARROW_SLOW_DOWN = OSError(
    "When initiating multiple part upload for key 'data/x.parquet' in bucket 'b': AWS Error "
    "SLOW_DOWN during CreateMultipartUpload operation: Please reduce your request rate."
)
PYARROW_HEAD_503 = OSError(
    "When getting information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) "
    "during HeadObject operation: No response body."
)
PYARROW_TIMEOUT = OSError(
    "When reading information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
    "GetObject operation: curlCode: 28, Timeout was reached"
)
PYARROW_DENIED = OSError(
    "When initiating multiple part upload for key 'x' in bucket 'b': AWS Error ACCESS_DENIED "
    "during CreateMultipartUpload operation: Access Denied"
)
PYARROW_403 = OSError(
    "When getting information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 403) "
    "during HeadObject operation: No response body."
)


class FakeClientError(Exception):
    """Shaped like botocore.exceptions.ClientError (module and response), without botocore."""

    __module__ = "botocore.exceptions"

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    __module__ = "botocore.exceptions"


def sqlalchemy_error(message: str) -> Exception:
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, Exception(message))


@pytest.mark.parametrize(
    "error",
    [
        PYARROW_SLOW_DOWN,
        PYARROW_HEAD_503,
        PYARROW_TIMEOUT,
        OSError("AWS Error SERVICE_UNAVAILABLE during PutObject operation"),
        OSError("AWS Error THROTTLING during PutObject operation: Rate exceeded"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        TimeoutError("timed out"),
        FakeClientError("SlowDown", 503),
        FakeClientError("InternalError", 500),
        FakeClientError("Throttling", 400),
        FakeClientError("SomethingNew", 502),
        FakeClientError("TooManyRequests", 429),
        EndpointConnectionError("Could not connect to the endpoint URL"),
        sqlalchemy_error(
            'connection to server at "127.0.0.1", port 5432 failed: Connection refused'
        ),
        sqlalchemy_error("server closed the connection unexpectedly"),
        sqlalchemy_error("database is locked"),
        TransientStorageError("flaky"),
        LockNotAcquiredError("icefleet:lock:t", 1.0),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[-40:]}",
)
def test_transient_errors_are_retried(error: Exception) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        PYARROW_DENIED,
        PYARROW_403,
        OSError("Parquet magic bytes not found in footer"),
        FileNotFoundError("Cannot get file info, file not found: s3://b/x"),
        PermissionError(errno.EACCES, "Permission denied"),
        FakeClientError("AccessDenied", 403),
        FakeClientError("NoSuchKey", 404),
        FakeClientError("InvalidArgument", 400),
        sqlalchemy_error('password authentication failed for user "icefleet"'),
        sqlalchemy_error("no such table: iceberg_tables"),
        ValueError("bad value"),
        InvalidEventError("id: required attribute is missing", "id"),
        CommitStateUnknownError("events.t", "timeout"),  # the committer decides, by the watermark
        RetriesExhaustedError("write x", 6, OSError("503")),  # never nest policies
        KeyError("x"),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[-40:]}",
)
def test_permanent_errors_are_not_retried(error: Exception) -> None:
    assert not is_transient(error)


def flaky(*errors: BaseException, result: Any = "ok") -> Any:
    """A callable that raises ``errors`` in turn, then returns ``result``; counts its calls."""
    pending = list(errors)

    def call(*args: Any, **kwargs: Any) -> Any:
        call.calls += 1  # type: ignore[attr-defined]
        call.args = (args, kwargs)  # type: ignore[attr-defined]
        if pending:
            raise pending.pop(0)
        return result

    call.calls = 0  # type: ignore[attr-defined]
    return call


def no_sleep_policy(**changes: Any) -> tuple[RetryPolicy, list[float]]:
    pauses: list[float] = []
    return RetryPolicy("test", attempts=4, base_s=0.1, max_wait_s=1.0, sleep=pauses.append).but(
        **changes
    ), pauses


def test_transient_errors_are_retried_until_the_call_succeeds() -> None:
    policy, pauses = no_sleep_policy()
    call = flaky(PYARROW_SLOW_DOWN, PYARROW_HEAD_503)
    assert policy.call("write x", call, 1, key="v") == "ok"
    assert call.calls == 3
    assert call.args == ((1,), {"key": "v"})
    # full jitter: each pause is random in [0, min(max, base * 2**n)]
    assert len(pauses) == 2
    assert 0 <= pauses[0] <= 0.1 and 0 <= pauses[1] <= 0.2


def test_the_last_failure_becomes_retries_exhausted_naming_operation_and_attempts() -> None:
    policy, pauses = no_sleep_policy()
    call = flaky(*([PYARROW_SLOW_DOWN] * 10))
    with pytest.raises(RetriesExhaustedError) as raised:
        policy.call("write s3://b/x.parquet", call)
    error = raised.value
    assert call.calls == 4 == error.attempts
    assert error.operation == "write s3://b/x.parquet"
    assert error.last_error is PYARROW_SLOW_DOWN and error.__cause__ is PYARROW_SLOW_DOWN
    assert "write s3://b/x.parquet failed after 4 attempts" in str(error)
    assert "SLOW_DOWN" in str(error)
    assert len(pauses) == 3


def test_a_permanent_error_is_raised_at_once_unchanged() -> None:
    policy, pauses = no_sleep_policy()
    call = flaky(PYARROW_SLOW_DOWN, PYARROW_DENIED)
    with pytest.raises(OSError) as raised:
        policy.call("write x", call)
    assert raised.value is PYARROW_DENIED
    assert call.calls == 2 and len(pauses) == 1


def test_waits_grow_exponentially_and_stay_under_the_cap() -> None:
    policy, pauses = no_sleep_policy(attempts=12, base_s=0.05, max_wait_s=0.4)
    with pytest.raises(RetriesExhaustedError):
        policy.call("x", flaky(*([TimeoutError("t")] * 20)))
    assert len(pauses) == 11
    assert all(0 <= p <= 0.4 for p in pauses)
    assert max(pauses[6:]) > 0.05  # with 5 draws up to 0.4, one is surely above the base


def test_a_custom_predicate_decides_what_is_retried() -> None:
    policy, _ = no_sleep_policy(retry_on=lambda e: isinstance(e, KeyError))
    assert policy.call("x", flaky(KeyError("a"), KeyError("b"))) == "ok"
    with pytest.raises(OSError):
        policy.call("x", flaky(PYARROW_SLOW_DOWN))


def test_decorator_form_and_policies_scaled_from_settings() -> None:
    pauses: list[float] = []

    @retried(STORAGE.but(sleep=pauses.append), "load")
    def load(n: int) -> int:
        """Loads."""
        if not pauses:
            raise PYARROW_TIMEOUT
        return n * 2

    assert load(21) == 42 and len(pauses) == 1
    assert load.__name__ == "load" and load.__doc__ == "Loads."
    storage, catalog = policies_for(100)
    assert (storage, catalog) == (STORAGE, CATALOG)
    quick, _ = policies_for(10)
    assert quick.base_s == pytest.approx(STORAGE.base_s / 10) and quick.attempts == STORAGE.attempts
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy("bad", attempts=0)
