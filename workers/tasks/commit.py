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

**Many tables at once.** A batch that fans out to many tables nudges them together
(:func:`nudge_tables`): their claims are taken in one round trip, and one commit task carries up
to :data:`TABLES_PER_TASK` of them. A committer process commits the tables of a task in a pool
of :data:`COMMIT_THREADS` threads; each table's lock keeps that table's commits serial, however
many threads and processes there are, so the exactly-once protocol (common/commit/committer.py)
is untouched. Threads overlap what a commit waits for (the catalog database, the metadata
files, Redis); processes (``ICEFLEET_COMMIT_CONCURRENCY``) add CPUs. Follow-ups of tables that
are not due yet are claimed in groups too. A table that fails in a task of several is that
table's failure alone: the others' commits stand, and the task is retried (Celery's backoff)
for the failed tables only, when their error may pass.

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
import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from celery import Task, shared_task
from celery.signals import worker_ready
from celery.utils.time import get_exponential_backoff_interval

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
#: Tables one commit task carries at most (a fan-out is cut into tasks of this many, so that
#: every committer process gets a share of it).
TABLES_PER_TASK = 8
#: Tables a committer process commits at once (threads; each table serial under its lock).
COMMIT_THREADS = 8
#: Follow-ups due within this many ms of each other share a commit task.
FOLLOW_UP_SLACK_MS = 50
# Delete each claim only while it still names this task.
_RELEASE_LUA = """
for i = 1, #KEYS do
  if redis.call('get', KEYS[i]) == ARGV[1] then
    redis.call('del', KEYS[i])
  end
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
    return bool(claim_commits(rt, [table], delay_ms, replace=replace))


def claim_commits(
    rt: Runtime, tables: Sequence[str], delay_ms: int = 0, *, replace: bool = False
) -> list[str]:
    """Send commit tasks for ``tables`` in ``delay_ms``, :data:`TABLES_PER_TASK` tables a task,
    leaving out the tables that have one on its way already; return the tables claimed."""
    ttl_ms = max(delay_ms + rt.settings.commit_interval_ms, 1)
    claimed: list[str] = []
    for start in range(0, len(tables), TABLES_PER_TASK):
        group = list(tables[start : start + TABLES_PER_TASK])
        task_id = f"commit-{uuid.uuid4()}"
        pipe = rt.client.pipeline(transaction=False)
        for table in group:
            pipe.set(keys.nudge(table), task_id, nx=not replace, px=ttl_ms)
        mine = [table for table, took in zip(group, pipe.execute(), strict=True) if took]
        if mine:
            commit_table.apply_async(
                mine, queue=COMMIT_QUEUE, task_id=task_id, countdown=delay_ms / 1000 or None
            )
            claimed.extend(mine)
    return claimed


def nudge(rt: Runtime, table: str) -> None:
    """Ask for a commit of ``table`` after writing to it; never fails the caller."""
    nudge_tables(rt, [table])


def nudge_tables(rt: Runtime, tables: Iterable[str]) -> None:
    """Ask for commits of ``tables`` after writing to them; never fails the caller."""
    names = list(tables)
    try:
        claim_commits(rt, names)
    except Exception:  # the sweep commits anyway; a write must not fail over a nudge
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        logger.exception("could not nudge the committer for %s (the sweep will commit it)", shown)


def delay_until_due_ms(rt: Runtime, table: str) -> int | None:
    """How long until the table is due for a commit (Committer.due_in_ms, at least
    :data:`MIN_DELAY_MS` unless due now); None if nothing is pending."""
    delay_ms = rt.committer.due_in_ms(table)
    return delay_ms if not delay_ms else max(MIN_DELAY_MS, delay_ms)


def commit_due(rt: Runtime, table: str) -> tuple[list[CommitResult], int | None]:
    """Commit ``table`` if due and forget old dedup entries; return the commits made and the
    delay until the table is due again (None: nothing left pending).

    Transient catalog and storage errors are retried here a few times (not a lock held by
    another committer: that one is already committing the table).
    """
    _, catalog_policy = policies_for(rt.settings.retry_base_ms)
    policy = catalog_policy.but(retry_on=is_transient_unless_locked)
    results = policy.call(f"commit of {table}", rt.committer.commit_table, table, force=False)
    if results:
        horizon_ms = int(time.time() * 1000) - rt.settings.dedup_window_s * 1000
        rt.committer.registry.trim_committed(table, horizon_ms)
    return results, delay_until_due_ms(rt, table)


def commit_and_follow_up(rt: Runtime, table: str) -> list[CommitResult]:
    """Commit ``table`` if due, forget old dedup entries, and claim a follow-up if still pending."""
    results, delay_ms = commit_due(rt, table)
    if delay_ms is not None:
        claim_commit(rt, table, delay_ms)
    return results


def claim_follow_ups(rt: Runtime, delays: dict[str, int]) -> None:
    """Claim follow-up commits, one task for tables due within :data:`FOLLOW_UP_SLACK_MS` of
    each other (a fan-out stays grouped), scheduled for the last of them."""
    ordered = sorted(delays.items(), key=lambda item: item[1])
    while ordered:
        first = ordered[0][1]
        group = [t for t, d in ordered[:TABLES_PER_TASK] if d - first <= FOLLOW_UP_SLACK_MS]
        claim_commits(rt, group, delays[group[-1]])
        ordered = ordered[len(group) :]


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_guard = threading.Lock()


def commit_pool() -> ThreadPoolExecutor:
    """This process' commit threads (made in the process that runs the tasks, not before a fork)."""
    global _pool, _pool_pid
    with _pool_guard:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="icefleet-commit")
            _pool_pid = os.getpid()
        return _pool


def commit_many(
    rt: Runtime, tables: Sequence[str]
) -> tuple[list[CommitResult], dict[str, int], dict[str, BaseException]]:
    """Commit the due ones of ``tables`` in the commit threads. Returns the commits made, the
    delay until each still-pending table is due, and each failed table's error (logged here)."""
    rt.committer  # noqa: B018  built here, not raced for by the threads
    futures = {table: commit_pool().submit(commit_due, rt, table) for table in tables}
    results: list[CommitResult] = []
    delays: dict[str, int] = {}
    failed: dict[str, BaseException] = {}
    for table, future in futures.items():
        try:
            done, delay_ms = future.result()
        except Exception as exc:
            failed[table] = exc
            logger.exception("commit of %s failed", table)
            continue
        results.extend(done)
        if delay_ms is not None:
            delays[table] = delay_ms
    return results, delays, failed


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
def commit_table(self: Task, table: str, *more: str) -> list[dict[str, Any]]:
    """Group-commit the pending batches of ``table`` (and of ``more`` tables, in the commit
    threads) once a threshold passes, else re-schedule."""
    rt = runtime(self.app)
    tables = [table, *more]
    task_id = self.request.id
    if task_id:
        rt.client.eval(_RELEASE_LUA, len(tables), *map(keys.nudge, tables), task_id)
    if not more:
        return [_summary(r) for r in commit_and_follow_up(rt, table)]
    results, delays, failed = commit_many(rt, tables)
    claim_follow_ups(rt, delays)
    again = [t for t, exc in failed.items() if isinstance(exc, COMMIT_RETRY_ON)]
    if again:
        # as autoretry_for would, but for the failed tables only: the others' commits stand
        retries = self.request.retries
        countdown = get_exponential_backoff_interval(1, retries, 30, full_jitter=True)
        raise self.retry(args=again, exc=failed[again[0]], countdown=countdown)
    return [_summary(r) for r in results]


@shared_task(bind=True, name=SWEEP_TASK, acks_late=True)
def commit_all(self: Task) -> list[dict[str, Any]]:
    """Commit every table with pending batches or a prepared record (the safety sweep)."""
    rt = runtime(self.app)
    _resend_lost(self, rt)
    _reconcile_budget(rt)
    # in the commit threads; one table's trouble does not stop the sweep of the others (its
    # error is logged, and the next sweep retries it)
    results, delays, _ = commit_many(rt, sorted(rt.committer.pending_tables()))
    claim_follow_ups(rt, delays)
    return [_summary(r) for r in results]


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
