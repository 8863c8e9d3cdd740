"""The Celery tasks and beat schedule of table maintenance, on a
:class:`~common.maintenance.maintainer.Maintainer` (shared with the CLI, ``icefleet compact`` ...).

Tasks run on the ``commit`` queue, beside the committer and under the same locks (routed by the
``icefleet.maintenance.*`` pattern in :mod:`workers.app`), scheduled by beat:

- ``compact_due`` (every ``ICEFLEET_MAINTENANCE_COMPACT_INTERVAL``, 10m): compacts tables whose
  small files reach ``ICEFLEET_COMPACT_TRIGGER_FILES``. The check is cheap: the current snapshot's
  ``total-data-files`` first, manifests (no data) only when that passes. A run rewrites at most
  :data:`MAX_RUN_TARGETS` target sizes, then sends ``compact_table`` for the rest, so commit tasks
  queued meanwhile run in between and commit latency stays flat while a backlog is compacted.
- ``expire_all`` (every ``ICEFLEET_MAINTENANCE_EXPIRE_INTERVAL``, 5m): expiry by policy
  (``ICEFLEET_EXPIRE_OLDER_THAN`` 15m, ``ICEFLEET_EXPIRE_RETAIN_LAST`` 100), which bounds the
  number of snapshots, and with it the time of every commit (about 0.7 ms per snapshot here).
- ``remove_orphans_all`` (daily): orphans older than ``ICEFLEET_ORPHAN_MIN_AGE`` (3d).

Maintenance tasks are acknowledged when they start (a lost run is redone by the next beat), and
have a time limit of their own, longer than the writers'.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from celery import Task, shared_task

from common.maintenance.maintainer import Maintainer
from common.settings import Settings
from common.wire import COMMIT_QUEUE

logger = logging.getLogger(__name__)

PREFIX = "icefleet.maintenance."
COMPACT_DUE_TASK = PREFIX + "compact_due"
COMPACT_TABLE_TASK = PREFIX + "compact_table"
EXPIRE_ALL_TASK = PREFIX + "expire_all"
ORPHANS_ALL_TASK = PREFIX + "remove_orphans_all"
MAX_RUN_TARGETS = 4  # target sizes rewritten per task run before handing the rest to the next
SOFT_LIMIT_S = 3_600
FOLLOW_UP_S = 1.0


def maintainer(app: Any = None) -> Maintainer:
    """The worker process' maintainer, on its runtime's catalog and Redis client."""
    from workers.runtime import runtime

    rt = runtime(app)
    return Maintainer(rt.settings, rt.catalog, rt.client)


# --- tasks -------------------------------------------------------------------------------------------

_TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": False,
    "soft_time_limit": SOFT_LIMIT_S,
    "time_limit": SOFT_LIMIT_S + 60,
}


def _each_table(m: Maintainer, what: str, action: Any) -> list[dict[str, Any]]:
    done = []
    for table in m.table_names():
        try:
            outcome = action(table)
        except Exception:  # one table's trouble must not stop the others
            logger.exception("%s of %s failed; the next run tries again", what, table)
            continue
        if outcome is not None:
            done.append(outcome)
    return done


def _compact_capped(self: Task, m: Maintainer, table: str) -> dict[str, Any]:
    options = m.compaction_options(
        max_rewrite_bytes=MAX_RUN_TARGETS * m.settings.compact_target_file_size_bytes
    )
    result = m.compact(table, options)
    if result.more:
        self.app.send_task(
            COMPACT_TABLE_TASK, args=[table], queue=COMMIT_QUEUE, countdown=FOLLOW_UP_S
        )
    summary = asdict(result)
    summary.pop("outputs")
    return summary


@shared_task(name=COMPACT_TABLE_TASK, **_TASK_OPTIONS)
def compact_table_task(self: Task, table: str) -> dict[str, Any]:
    """Compact ``table`` (one capped run; the rest follows in another task)."""
    return _compact_capped(self, maintainer(self.app), table)


@shared_task(name=COMPACT_DUE_TASK, **_TASK_OPTIONS)
def compact_due(self: Task) -> list[dict[str, Any]]:
    """Compact every table whose small files reached the trigger."""
    m = maintainer(self.app)

    def action(table: str) -> dict[str, Any] | None:
        return _compact_capped(self, m, table) if m.compaction_due(table) else None

    return _each_table(m, "compaction", action)


@shared_task(name=EXPIRE_ALL_TASK, **_TASK_OPTIONS)
def expire_all(self: Task) -> list[dict[str, Any]]:
    """Expire the snapshots of every table by the configured policy."""
    m = maintainer(self.app)
    return _each_table(m, "expiry", lambda table: asdict(m.expire(table)))


@shared_task(name=ORPHANS_ALL_TASK, **_TASK_OPTIONS)
def remove_orphans_all(self: Task) -> list[dict[str, Any]]:
    """Remove the orphan files of every table (older than the configured minimum age)."""
    m = maintainer(self.app)

    def action(table: str) -> dict[str, Any]:
        report = asdict(m.remove_orphans(table))
        report["orphans"] = len(report["orphans"])
        return report

    return _each_table(m, "orphan removal", action)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat entries for the maintenance tasks (merged into the app's schedule)."""

    def entry(task: str, every_s: float) -> dict[str, Any]:
        # a run not started within its interval is superseded by the next one
        return {
            "task": task,
            "schedule": every_s,
            "options": {"queue": COMMIT_QUEUE, "expires": every_s},
        }

    return {
        "maintenance-compact": entry(COMPACT_DUE_TASK, settings.maintenance_compact_interval_s),
        "maintenance-expire": entry(EXPIRE_ALL_TASK, settings.maintenance_expire_interval_s),
        "maintenance-orphans": entry(ORPHANS_ALL_TASK, settings.maintenance_orphans_interval_s),
    }


__all__ = [
    "COMPACT_DUE_TASK",
    "COMPACT_TABLE_TASK",
    "EXPIRE_ALL_TASK",
    "ORPHANS_ALL_TASK",
    "beat_schedule",
    "compact_due",
    "compact_table_task",
    "expire_all",
    "maintainer",
    "remove_orphans_all",
]
