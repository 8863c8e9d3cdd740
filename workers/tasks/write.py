"""The write task: one batch of events → Parquet files registered as pending → a nudge.

A batch is never lost. Delivery is at least once (``acks_late``, ``reject_on_worker_lost``, a hard
time limit puts the message back) and :class:`~common.write.batch_writer.BatchWriter` is idempotent per batch
id. A failure is retried with exponential backoff and jitter; a batch that still fails after
:data:`MAX_ATTEMPTS` deliveries (:data:`MAX_ATTEMPTS_UNEXPECTED` for errors not known to pass),
or whose process keeps dying under it, goes whole to the dead-letter store with the reason, from
where it can be sent again.

**Time limit and partial progress.** A batch is written in chunks (:mod:`common.write.partial`). When
the next chunk would end after 80% of ``ICEFLEET_WRITE_TIMEOUT_S`` (Celery's soft limit), or the
soft limit interrupts a chunk, or the worker is shutting down, the part written is registered and
the rest is enqueued again as a child batch ``<batch id>~<offset>``; a split point recorded in
Redis makes a redelivery of the parent repeat exactly that split.

**Graceful shutdown.** On SIGTERM (Celery's warm shutdown) the worker stops taking tasks and waits
for the running one; the writer sees :func:`shutdown_requested` between chunks and hands the rest
of its batch back instead of writing on, so a stop is quick whatever the batch size. A writer
killed outright loses nothing either: its message was not acknowledged (``acks_late``).
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_shutting_down

from common.coord.bindings import BatchBindings
from common.coord.claims import EventRow, release_events
from common.coord.pending import PendingRegistry
from common.errors import BatchConflictError, PayloadEncodingError
from common.ingest.events import DeadLetter, Event, parse_batch
from common.ingest.payloads import pack, unpack
from common.ingest.producer import enqueue_write_task
from common.ingest.routing import Router
from common.lake.catalog import preload_catalog_modules
from common.lake.retry import worth_retrying_later
from common.wire import INGEST_QUEUE, WRITE_TASK, WriteTask, content_digest, split_child_id
from common.write.batch_writer import BatchResult
from common.write.partial import Remainder, SplitRecords, chunk_events, deadline_for
from workers.limits import WRITE_RETRY_MAX_BACKOFF_S
from workers.runtime import Runtime, runtime
from workers.tasks.commit import nudge_tables

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
MAX_ATTEMPTS_UNEXPECTED = 3
MAX_BACKOFF_S = WRITE_RETRY_MAX_BACKOFF_S


def _transient(exc: BaseException) -> bool:
    return worth_retrying_later(exc) or isinstance(exc, SoftTimeLimitExceeded)


def backoff_s(attempt: int) -> float:
    """Exponential backoff with full jitter: up to 1, 2, 4, ... seconds, at most a minute."""
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, 2.0 ** (attempt - 1))


# --- graceful shutdown: a flag the worker's main process sets and its pool processes read --------

_shutdown: Any = None  # a shared byte, created in the main process before the pool forks


@worker_init.connect
def _create_shutdown_flag(**_: Any) -> None:
    global _shutdown
    _shutdown = multiprocessing.get_context("fork").RawValue("b", 0)


@worker_init.connect
def _preload_modules(**_: Any) -> None:
    # Before the pool forks: no task's soft time limit can interrupt these imports.
    preload_catalog_modules()


@worker_shutting_down.connect
def _flag_shutdown(**_: Any) -> None:
    # Runs in the main process' signal handler: a plain store into shared memory, no lock.
    if _shutdown is not None:
        _shutdown.value = 1


def shutdown_requested() -> bool:
    """Whether this worker is shutting down (SIGTERM, SIGINT): hand the batch back, don't finish."""
    return _shutdown is not None and bool(_shutdown.value)


# --- dead letters and hand-backs --------------------------------------------------------------------


def dead_letter_batch(
    rt: Runtime,
    batch_id: str,
    payload: str | bytes,
    table: str | None,
    reason: str,
    split_at: int | None = None,
    enqueued_at_ms: int | None = None,
) -> None:
    """Keep what did not land in the dead-letter store and stop tracking the batch.

    Events of a table that already holds this batch (an earlier attempt registered it) are left
    out, so a replay cannot land them twice; the others give back their claims on their
    identities, so a replay lands them. A batch split by an earlier attempt keeps only its
    events before the split point; the rest is its child's, which is enqueued (again) instead.
    """
    parsed = parse_batch(payload, batch_id=batch_id, max_event_bytes=rt.settings.max_event_bytes)
    events = parsed.events
    if split_at is not None:
        rest = events[split_at:]
        if rest:
            child = Remainder(
                split_child_id(batch_id, split_at),
                split_at,
                len(rest),
                "".join(f"{event.raw}\n" for event in rest),
            )
            hand_back(rt, child, table, enqueued_at_ms)
        events = events[:split_at]
    landed = _tables_holding(rt, batch_id, events, table)
    kept = [(i, e, _table_of(rt, e, table)) for i, e in enumerate(events)]
    kept = [(i, e, name) for i, e, name in kept if name not in landed]
    if split_at is not None or landed:
        items = sorted(
            [(e.position, e.raw.encode()) for _, e, _ in kept]
            + ([(d.position, d.raw) for d in parsed.dead_letters] if split_at is None else [])
        )
        payload = b"".join(raw + b"\n" for _, raw in items)
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if raw:
        rt.dead_letters.add([DeadLetter(batch_id, 0, reason, None, raw)], table=table)
    # Their claims go with them (common/coord/claims.py): a replay of the dead letter must land.
    rows: dict[str, list[EventRow]] = {}
    for i, e, name in kept:
        if rt.settings.dedupe_for(name):
            rows.setdefault(name, []).append((i, e.attributes["source"], e.attributes["id"], e.raw))
    release_events(PendingRegistry(rt.client).claims, batch_id, rows, rt.settings.dedup_window_s)
    rt.outstanding.done(batch_id)
    logger.error("batch %s dead-lettered whole: %s", batch_id, reason)


def _table_of(rt: Runtime, event: Event, table: str | None) -> str:
    if table is not None:
        return table
    return str(
        Router(rt.settings.routes, rt.settings.namespace, rt.settings.unrouted).table_for(
            event.attributes["type"]
        )
    )


def _tables_holding(rt: Runtime, batch_id: str, events: list[Event], table: str | None) -> set[str]:
    """The tables of ``events`` in which this batch is already pending or committed."""
    registry = PendingRegistry(rt.client)
    tables = {_table_of(rt, event, table) for event in events}
    return {name for name in tables if registry.is_known(name, batch_id)}


def hand_back(
    rt: Runtime, remainder: Remainder, table: str | None, enqueued_at_ms: int | None
) -> None:
    """Enqueue the rest of a split batch as its child: outstanding first, then the message."""
    packed, encoding = pack(remainder.payload)
    task = WriteTask(remainder.batch_id, packed, table, enqueued_at_ms, encoding)
    enqueue_write_task(
        rt.client,
        lambda kwargs: write_batch.apply_async(kwargs=kwargs, queue=INGEST_QUEUE),
        task,
        ttl_s=rt.settings.dedup_window_s,
    )
    logger.info("handed back %d event(s) as batch %s", remainder.events, remainder.batch_id[:200])


def _summary(result: BatchResult) -> dict[str, Any]:
    return {
        "batch_id": result.batch_id,
        "events": result.events,
        "records": result.records,
        "files": {table: len(files) for table, files in result.files.items()},
        "skipped_tables": result.skipped_tables,
        "dead_letters": len(result.dead_letters),
        "handed_back": result.remainder.batch_id if result.remainder else None,
    }


@shared_task(bind=True, name=WRITE_TASK, acks_late=True, max_retries=None)
def write_batch(
    self: Task,
    batch_id: str,
    payload: str,
    table: str | None = None,
    enqueued_at_ms: int | None = None,
    encoding: str | None = None,
) -> dict[str, Any]:
    """Write one batch to Parquet, register its files as pending and nudge the committer.

    ``payload`` is NDJSON (or any payload :func:`~common.ingest.events.parse_batch` reads), as text or
    packed as ``encoding`` says (:mod:`common.ingest.payloads`).
    """
    rt = runtime(self.app)
    try:
        try:
            text = unpack(payload, encoding)
        except PayloadEncodingError as exc:
            return _refuse_payload(rt, batch_id, payload, table, str(exc))
        try:  # the id must still name these events (common/coord/bindings.py)
            BatchBindings(rt.client, rt.settings.dedup_window_s).bind(
                batch_id, content_digest(text, table)
            )
        except BatchConflictError as exc:
            return _refuse_payload(rt, batch_id, text, table, str(exc))
        result = _write(self, rt, batch_id, text, table, enqueued_at_ms)
        result["payload_bytes"] = len(text)
        if "dead_lettered" in result:  # what the metrics count as dead-lettered events
            result["payload_lines"] = (
                text.count(b"\n") if isinstance(text, bytes) else text.count("\n")
            )
        return result
    except Retry:
        raise
    except SoftTimeLimitExceeded as exc:
        # The limit hit outside the chunks (registration, hand-back): send the batch again; its
        # split record, if any, makes the next delivery finish exactly this split.
        logger.warning("batch %s: time limit hit after writing; retrying", batch_id)
        raise self.retry(exc=exc, countdown=backoff_s(1)) from exc
    except redis.RedisError as exc:
        # Redis failed outside the write itself (bookkeeping, dead-lettering): put the message
        # back rather than let a failed task be acknowledged and the batch forgotten.
        logger.warning("batch %s: Redis failed (%s); requeueing", batch_id, exc)
        raise Reject(exc, requeue=True) from exc


def _refuse_payload(
    rt: Runtime, batch_id: str, payload: str | bytes, table: str | None, reason: str
) -> dict[str, Any]:
    """Keep a payload that cannot be decoded, as it came, in the dead-letter store."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    rt.dead_letters.add([DeadLetter(batch_id, 0, reason, None, raw)], table=table)
    rt.outstanding.done(batch_id)
    logger.error("batch %s dead-lettered whole: %s", batch_id, reason)
    return {"batch_id": batch_id, "dead_lettered": reason}


def _write(
    task: Task,
    rt: Runtime,
    batch_id: str,
    payload: str | bytes,
    table: str | None,
    enqueued_at_ms: int | None,
) -> dict[str, Any]:
    started = time.monotonic()
    splits = SplitRecords(rt.client, rt.settings.dedup_window_s)
    attempt = rt.outstanding.started(batch_id)
    split_at = splits.get(batch_id)
    if enqueued_at_ms is None:  # fixed now, so that a child batch carries the same time
        enqueued_at_ms = int(time.time() * 1000)
    if attempt > MAX_ATTEMPTS:
        reason = f"write task started {attempt - 1} times without finishing (killed or timed out)"
        dead_letter_batch(rt, batch_id, payload, table, reason, split_at, enqueued_at_ms)
        return {"batch_id": batch_id, "dead_lettered": reason}
    try:
        result = rt.writer.write(
            batch_id,
            payload,
            table=table,
            enqueued_at_ms=enqueued_at_ms,
            chunk_events=chunk_events(rt.settings.batch_max_events, attempt),
            deadline=deadline_for(rt.settings.write_timeout_s, started),
            stop=shutdown_requested,
            interrupt=(SoftTimeLimitExceeded,),
            split_at=split_at,
            on_split=lambda offset: splits.record(batch_id, offset),
        )
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
        split_at = splits.get(batch_id)
        dead_letter_batch(rt, batch_id, payload, table, reason, split_at, enqueued_at_ms)
        return {"batch_id": batch_id, "dead_lettered": reason}
    if result.remainder is not None:
        hand_back(rt, result.remainder, table, enqueued_at_ms)
    rt.outstanding.done(batch_id)
    nudge_tables(rt, sorted(set(result.files) | set(result.skipped_tables)))
    return _summary(result)
