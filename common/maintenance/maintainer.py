"""Table maintenance wired to the catalog, Redis and the table locks.

:class:`Maintainer` is what the CLI (``icefleet compact`` ...) and the scheduled tasks
(:mod:`workers.tasks.maintenance`) share: it opens each table, takes its
:class:`~common.coord.locks.TableLock` for every catalog change, and keeps pending files (Redis) out
of compaction, expiry and orphan removal. The operations themselves are the modules beside it;
they are imported when first used, so a CLI command loads only what it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from common.coord.locks import TableLock, table_lock
from common.coord.pending import PendingRegistry
from common.ingest.routing import TableName
from common.lake.catalog import catalog_tables
from common.maintenance.catalog_sync import SyncReport, sync_catalog
from common.maintenance.compaction import CompactionResult
from common.maintenance.compaction_plan import CompactionOptions, CompactionPlan
from common.maintenance.expiry import ExpiryPolicy, ExpiryReport
from common.maintenance.orphans import OrphanReport
from common.maintenance.verify import VerifyReport
from common.settings import Settings


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
        from common.maintenance.compaction_plan import plan_compaction

        options = options or self.compaction_options()
        return plan_compaction(self.load(table), options, exclude=self.pending(table))

    def compact(self, table: str, options: CompactionOptions | None = None) -> CompactionResult:
        from common.lake.uploads import ObjectWriter
        from common.maintenance.compaction import compact_table

        return compact_table(
            self.load(table),
            options or self.compaction_options(),
            lock=self.lock(table),
            exclude=self.pending(table),
            row_group_rows=self.settings.row_group_rows,
            compression=self.settings.compression,
            objects=ObjectWriter(self.settings.s3_checksum),
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


__all__ = ["Maintainer"]
