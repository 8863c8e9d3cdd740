"""The write task: one batch of events → Parquet files registered as pending → a nudge.

A batch is never lost. Delivery is at least once (``acks_late``, ``reject_on_worker_lost``, a hard
time limit puts the message back) and :class:`~common.writer.BatchWriter` is idempotent per batch
id. A failure is retried with exponential backoff and jitter; a batch that still fails after
:data:`MAX_ATTEMPTS` deliveries (:data:`MAX_ATTEMPTS_UNEXPECTED` for errors not known to pass),
or whose process keeps dying under it, goes whole to the dead-letter store with the reason, from
where it can be sent again.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from pyiceberg.exceptions import CommitFailedException

from common.errors import RetryableError
from common.events import DeadLetter
from common.producer import WRITE_TASK
from common.writer import BatchResult
from workers.committer import nudge
from workers.runtime import Runtime, runtime

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
MAX_ATTEMPTS_UNEXPECTED = 3
MAX_BACKOFF_S = 60.0
TRANSIENT = (
    RetryableError,
    CommitFailedException,  # a schema change raced another process; evolve again
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,  # storage I/O, sockets
    SoftTimeLimitExceeded,
)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT):
        return True
    try:  # catalog database unreachable or locked (SQLite "database is locked")
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy comes with the SQL catalog
        return False
    return isinstance(exc, OperationalError)


def backoff_s(attempt: int) -> float:
    """Exponential backoff with full jitter: up to 1, 2, 4, ... seconds, at most a minute."""
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, 2.0 ** (attempt - 1))


def dead_letter_batch(
    rt: Runtime, batch_id: str, payload: str | bytes, table: str | None, reason: str
) -> None:
    """Keep the whole payload in the dead-letter store and stop tracking the batch."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    rt.dead_letters.add([DeadLetter(batch_id, 0, reason, None, raw)], table=table)
    rt.outstanding.done(batch_id)
    logger.error("batch %s dead-lettered whole: %s", batch_id, reason)


def _summary(result: BatchResult) -> dict[str, Any]:
    return {
        "batch_id": result.batch_id,
        "events": result.events,
        "records": result.records,
        "files": {table: len(files) for table, files in result.files.items()},
        "skipped_tables": result.skipped_tables,
        "dead_letters": len(result.dead_letters),
    }


@shared_task(bind=True, name=WRITE_TASK, acks_late=True, max_retries=None)
def write_batch(
    self: Task,
    batch_id: str,
    payload: str,
    table: str | None = None,
    enqueued_at_ms: int | None = None,
) -> dict[str, Any]:
    """Write one batch to Parquet, register its files as pending and nudge the committer."""
    rt = runtime(self.app)
    try:
        return _write(self, rt, batch_id, payload, table, enqueued_at_ms)
    except Retry:
        raise
    except redis.RedisError as exc:
        # Redis failed outside the write itself (bookkeeping, dead-lettering): put the message
        # back rather than let a failed task be acknowledged and the batch forgotten.
        logger.warning("batch %s: Redis failed (%s); requeueing", batch_id, exc)
        raise Reject(exc, requeue=True) from exc


def _write(
    task: Task,
    rt: Runtime,
    batch_id: str,
    payload: str,
    table: str | None,
    enqueued_at_ms: int | None,
) -> dict[str, Any]:
    attempt = rt.outstanding.started(batch_id)
    if attempt > MAX_ATTEMPTS:
        reason = f"write task started {attempt - 1} times without finishing (killed or timed out)"
        dead_letter_batch(rt, batch_id, payload, table, reason)
        return {"batch_id": batch_id, "dead_lettered": reason}
    try:
        result = rt.writer.write(batch_id, payload, table=table, enqueued_at_ms=enqueued_at_ms)
    except Exception as exc:
        limit = MAX_ATTEMPTS if _transient(exc) else MAX_ATTEMPTS_UNEXPECTED
        if attempt < limit:
            delay = backoff_s(attempt)
            logger.warning(
                "batch %s: attempt %d failed (%s: %s); retrying in %.1fs",
                batch_id,
                attempt,
                type(exc).__name__,
                exc,
                delay,
            )
            raise task.retry(exc=exc, countdown=delay) from exc
        logger.exception("batch %s: attempt %d failed, giving up", batch_id, attempt)
        reason = f"write failed after {attempt} attempt(s): {type(exc).__name__}: {exc}"[:2000]
        dead_letter_batch(rt, batch_id, payload, table, reason)
        return {"batch_id": batch_id, "dead_lettered": reason}
    rt.outstanding.done(batch_id)
    for name in sorted(set(result.files) | set(result.skipped_tables)):
        nudge(rt, name)
    return _summary(result)
