"""The commit tasks: ``commit_table`` (group commit of one table) and ``commit_all`` (the sweep).

**Nudges without a flood.** Every written batch asks for a commit of its table, but a thousand
batches a second must not become a thousand commit tasks. ``icefleet:nudge:<table>`` is a *claim*:
it holds the id of the commit task that is on its way for the table, and a new task is sent only
when ``SET ... NX`` takes the claim. A commit task releases its own claim when it starts, before
it reads the pending batches, and when it ends with batches still pending (not due yet, or more
than one snapshot's worth) it claims again and schedules itself with the time left until they
are due. So every registered batch is followed by a commit task that starts after it: either its
writer took the claim, or the claim was held by a task that had not started yet. Duplicates
(a claim expired while its task waited in the queue) merge at their next claim.

**The sweep.** ``commit_all`` runs from beat every few seconds and once when a committer starts:
it commits every table with pending batches or a prepared record (a crashed committer's commit is
recovered there) and re-claims for tables that are not due. It is the safety net for a lost
message or a commit task that gave up; latency normally comes from the claims.

**Faults.** A commit that fails on a transient catalog or storage error (the catalog database
restarting, S3 throttling: common/lake/retry.py) is run again in the task after a short jittered
pause; re-running is always safe, since every run starts by resolving the prepared record. Longer
outages are retried by Celery (``autoretry_for``) and, failing that, by the next sweep.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import redis
from celery import Task, shared_task
from celery.signals import worker_ready

from common.commit.committer import CommitResult
from common.coord import keys
from common.coord.budget import reconcile
from common.coord.redis_memory import warn_about_eviction
from common.coord.resend import resend_lost
from common.errors import (
    CommitStateUnknownError,
    LockLostError,
    RetriesExhaustedError,
    RetryableError,
)
from common.lake.retry import is_transient_unless_locked, policies_for
from common.wire import COMMIT_QUEUE, COMMIT_TASK, INGEST_QUEUE, SWEEP_TASK, WRITE_TASK
from workers.limits import visibility_timeout_s
from workers.runtime import Runtime, runtime

logger = logging.getLogger(__name__)

MIN_DELAY_MS = 20
# Delete the claim only while it still names this task.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
COMMIT_RETRY_ON = (
    RetryableError,
    CommitStateUnknownError,
    LockLostError,
    RetriesExhaustedError,
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


def claim_commit(rt: Runtime, table: str, delay_ms: int = 0, *, replace: bool = False) -> bool:
    """Send a commit task for ``table`` in ``delay_ms`` unless one is already on its way."""
    task_id = f"commit-{uuid.uuid4()}"
    ttl_ms = delay_ms + rt.settings.commit_interval_ms
    if not rt.client.set(keys.nudge(table), task_id, nx=not replace, px=max(ttl_ms, 1)):
        return False
    commit_table.apply_async(
        [table], queue=COMMIT_QUEUE, task_id=task_id, countdown=delay_ms / 1000 or None
    )
    return True


def nudge(rt: Runtime, table: str) -> None:
    """Ask for a commit of ``table`` after writing to it; never fails the caller."""
    try:
        claim_commit(rt, table)
    except Exception:  # the sweep commits anyway; a write must not fail over a nudge
        logger.exception("could not nudge the committer for %s (the sweep will commit it)", table)


def delay_until_due_ms(rt: Runtime, table: str) -> int | None:
    """How long until the table's pending batches pass a threshold; None if nothing is pending."""
    registry = rt.committer.registry
    stats = registry.stats(table)
    if stats.count == 0:
        return 0 if registry.prepared(table) is not None else None
    settings = rt.settings
    if stats.count >= settings.commit_max_files or stats.bytes >= settings.commit_max_bytes:
        return 0
    now_ms = int(time.time() * 1000)
    oldest = stats.oldest_registered_ms or now_ms
    return max(MIN_DELAY_MS, oldest + settings.commit_interval_ms - now_ms)


def commit_and_follow_up(rt: Runtime, table: str) -> list[CommitResult]:
    """Commit ``table`` if due, forget old dedup entries, and claim a follow-up if still pending.

    Transient catalog and storage errors are retried here a few times (not a lock held by
    another committer: that one is already committing the table).
    """
    _, catalog_policy = policies_for(rt.settings.retry_base_ms)
    policy = catalog_policy.but(retry_on=is_transient_unless_locked)
    results = policy.call(f"commit of {table}", rt.committer.commit_table, table, force=False)
    if results:
        horizon_ms = int(time.time() * 1000) - rt.settings.dedup_window_s * 1000
        rt.committer.registry.trim_committed(table, horizon_ms)
    delay_ms = delay_until_due_ms(rt, table)
    if delay_ms is not None:
        claim_commit(rt, table, delay_ms)
    return results


def _summary(result: CommitResult) -> dict[str, Any]:
    return {
        "table": result.table,
        "seq": result.seq,
        "batches": result.batches,
        "files": result.files,
        "records": result.records,
        "snapshot_id": result.snapshot_id,
        "recovered": result.recovered,
        "ms": round(result.duration_ms),
    }


@shared_task(
    bind=True,
    name=COMMIT_TASK,
    acks_late=True,
    autoretry_for=COMMIT_RETRY_ON,
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=5,
)
def commit_table(self: Task, table: str) -> list[dict[str, Any]]:
    """Group-commit the pending batches of ``table`` once a threshold passes (else re-schedule)."""
    rt = runtime(self.app)
    task_id = self.request.id
    if task_id:
        rt.client.eval(_RELEASE_LUA, 1, keys.nudge(table), task_id)
    return [_summary(r) for r in commit_and_follow_up(rt, table)]


@shared_task(bind=True, name=SWEEP_TASK, acks_late=True)
def commit_all(self: Task) -> list[dict[str, Any]]:
    """Commit every table with pending batches or a prepared record (the safety sweep)."""
    rt = runtime(self.app)
    _resend_lost(self, rt)
    _reconcile_budget(rt)
    summaries: list[dict[str, Any]] = []
    for table in sorted(rt.committer.pending_tables()):
        try:
            summaries.extend(_summary(r) for r in commit_and_follow_up(rt, table))
        except Exception:  # one table's trouble must not stop the sweep of the others
            logger.exception("sweep: commit of %s failed; next sweep retries", table)
    return summaries


def _resend_lost(task: Task, rt: Runtime) -> None:
    """Send again the write tasks whose message was lost on its way (common/coord/resend.py)."""
    older_than_s = rt.settings.resend_after_s or visibility_timeout_s(rt.settings) + 60
    try:
        lost = resend_lost(
            rt.client,
            lambda kwargs: task.app.send_task(WRITE_TASK, kwargs=kwargs, queue=INGEST_QUEUE),
            older_than_s=older_than_s,
        )
    except redis.RedisError:
        logger.exception("sweep: could not look for lost write tasks; next sweep retries")
        return
    if lost:
        shown = ", ".join(b[:80] for b in lost[:5]) + (", ..." if len(lost) > 5 else "")
        logger.warning(
            "sweep: sent %d batch(es) again, their message was lost: %s", len(lost), shown
        )


def _reconcile_budget(rt: Runtime) -> None:
    """Free budget held by batches that left *outstanding* another way (common/coord/budget.py)."""
    try:
        freed = reconcile(rt.client)
    except redis.RedisError:
        logger.exception("sweep: could not reconcile the budget; next sweep retries")
        return
    if freed:
        logger.warning("sweep: freed the budget of %d batch(es) no longer outstanding", freed)


@worker_ready.connect
def _sweep_at_start(sender: Any = None, **_: Any) -> None:
    """A committer that starts recovers what a crashed one left (prepared records, pending)."""
    consumer = getattr(sender, "task_consumer", None)
    queues = {q.name for q in getattr(consumer, "queues", ())}
    if COMMIT_QUEUE in queues:
        rt = runtime(sender.app)
        warn_about_eviction(rt.client, rt.settings.budget)  # once per fleet: its committer
        sender.app.send_task(SWEEP_TASK, queue=COMMIT_QUEUE)
