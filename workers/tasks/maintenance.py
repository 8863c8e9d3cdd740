"""Table maintenance wired to the catalog, Redis and the table locks; its Celery tasks and beat.

:class:`Maintainer` is what the CLI (``icefleet compact`` ...) and the tasks share: it opens each
table, takes its :class:`~common.coord.locks.TableLock` for every catalog change, and keeps pending files
(Redis) out of compaction, expiry and orphan removal.

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
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import redis
from celery import Task, shared_task
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from common.coord.locks import TableLock, table_lock
from common.coord.pending import PendingRegistry
from common.ingest.routing import TableName
from common.maintenance.catalog_sync import SyncReport, sync_catalog
from common.maintenance.compaction import CompactionOptions, CompactionPlan, CompactionResult
from common.maintenance.expiry import ExpiryPolicy, ExpiryReport
from common.maintenance.orphans import OrphanReport
from common.maintenance.verify import VerifyReport
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


class Maintainer:
    """Maintenance of the tables of one catalog, coordinated through Redis."""

    def __init__(self, settings: Settings, catalog: Catalog, client: redis.Redis) -> None:
        self.settings = settings
        self.catalog = catalog
        self.client = client
        self.registry = PendingRegistry(client)

    # --- plumbing ----------------------------------------------------------------------------------

    def lock(self, table: str) -> TableLock:
        return table_lock(self.client, table, self.settings)

    def table_names(self, names: Sequence[str] = ()) -> list[str]:
        """``names`` checked and normalised, or every table of the catalog when empty."""
        from workers.cli.status import catalog_tables

        if not names:
            return catalog_tables(self.catalog)
        return [str(TableName.parse(name)) for name in names]

    def load(self, table: str) -> Table:
        return self.catalog.load_table(TableName.parse(table).parts)

    def pending(self, table: str) -> set[str]:
        from common.maintenance.orphans import pending_paths

        return pending_paths(self.registry, table)

    def compaction_options(self, **overrides: Any) -> CompactionOptions:
        settings = self.settings
        values: dict[str, Any] = {
            "target_file_size_bytes": settings.compact_target_file_size_bytes,
            "small_file_fraction": settings.compact_small_file_fraction,
            "min_files": settings.compact_min_files,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return CompactionOptions(**values)

    # --- operations --------------------------------------------------------------------------------

    def plan(self, table: str, options: CompactionOptions | None = None) -> CompactionPlan:
        from common.maintenance.compaction import plan_compaction

        options = options or self.compaction_options()
        return plan_compaction(self.load(table), options, exclude=self.pending(table))

    def compact(self, table: str, options: CompactionOptions | None = None) -> CompactionResult:
        from common.maintenance.compaction import compact_table

        return compact_table(
            self.load(table),
            options or self.compaction_options(),
            lock=self.lock(table),
            exclude=self.pending(table),
            row_group_rows=self.settings.row_group_rows,
            compression=self.settings.compression,
        )

    def compaction_due(self, table: str) -> bool:
        """Whether ``table`` has at least ``compact_trigger_files`` small files to compact."""
        trigger = self.settings.compact_trigger_files
        snapshot = self.load(table).current_snapshot()
        summary = snapshot.summary.additional_properties if snapshot and snapshot.summary else {}
        if int(summary.get("total-data-files", 0)) < trigger:
            return False
        return self.plan(table).files >= trigger

    def expire(
        self, table: str, policy: ExpiryPolicy | None = None, *, dry_run: bool = False
    ) -> ExpiryReport:
        from common.maintenance.expiry import expire_snapshots

        policy = policy or ExpiryPolicy(
            self.settings.expire_older_than_s, self.settings.expire_retain_last
        )
        return expire_snapshots(
            self.load(table),
            policy,
            lock=self.lock(table),
            registry=self.registry,
            dry_run=dry_run,
        )

    def remove_orphans(
        self, table: str, min_age_s: float | None = None, *, dry_run: bool = False
    ) -> OrphanReport:
        from common.maintenance.orphans import remove_orphans

        age = self.settings.orphan_min_age_s if min_age_s is None else min_age_s
        return remove_orphans(
            self.load(table), registry=self.registry, min_age_s=age, dry_run=dry_run
        )

    def verify(self, table: str) -> VerifyReport:
        from common.maintenance.verify import verify_table

        return verify_table(self.load(table))

    def delete(self, table: str, where: str) -> int:
        from common.maintenance.deletes import delete_rows

        removed, _ = delete_rows(self.load(table), where, lock=self.lock(table))
        return removed

    def sync_catalog(self, *, dry_run: bool = False) -> SyncReport:
        return sync_catalog(self.catalog, lock_for=self.lock, dry_run=dry_run)


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
    "Maintainer",
    "beat_schedule",
    "compact_due",
    "compact_table_task",
    "expire_all",
    "maintainer",
    "remove_orphans_all",
]
