"""Group commit with exactly-once semantics (design.md §3).

Per table, under the table lock:

1. **Recover.** If a *prepared* record is left in Redis (a committer died or lost the reply of a
   commit), refresh the table and read the watermark: if the prepared seq is there, the commit
   landed, so finish it (clear pending); otherwise commit again, same seq, same batches. Landed
   is verified, not trusted: the snapshot of that seq (or the table property, once the
   snapshot is expired) carries ``icefleet.commit-batches``, a digest of the batch ids it
   committed, which must equal the prepared record's; else :class:`CommitVerificationError`
   stops the table (another fleet on the same table, a Redis restored from an old copy) and
   pending is left as it is for an operator.
2. **Prepare.** Take the pending batches, pick ``seq = watermark + 1`` and write the prepared
   record (seq and batch ids) before touching the catalog.
3. **Commit.** One append snapshot (a merge append: small manifests are merged once there are
   100, so commit time stays flat as the table ages) for all their files, with ``icefleet.commit-seq``
   and ``icefleet.commit-batches`` (16 hex digits) in the snapshot summary and in the table properties, in one catalog transaction that asserts the
   snapshot it was based on. Right before every attempt the lock is checked and the watermark is
   re-read, so a commit whose reply was lost is never applied twice. pyiceberg's own commit retry
   is off for these commits; ours (tenacity: exponential backoff, jitter, bounded attempts) owns it.
4. **Finish.** Atomically move the batch ids from pending to committed and drop the prepared
   record (only if it is still ours).

Why the watermark is also a table property: snapshot expiry removes old snapshots, and with them
the summaries; the property lives in the current metadata whatever is expired.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, CommitStateUnknownException
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table, Transaction
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.update import TableUpdate

from common.commit.watermark import (
    BATCHES_PROPERTY,
    SEQ_PROPERTY,
    PreparedCommit,
    batches_digest,
    committed_seq,
    landed_digest,
)
from common.coord.locks import TableLock, table_lock
from common.coord.pending import PendingEntry, PendingRegistry
from common.coord.replies import as_text
from common.errors import (
    CommitConflictError,
    CommitStateUnknownError,
    CommitVerificationError,
    MissingDataFileError,
    RetryableError,
)
from common.ingest.routing import TableName
from common.lake.retry import RetryPolicy
from common.lake.storage import check_data_files
from common.settings import Settings

logger = logging.getLogger(__name__)

NO_RETRY = {"commit.retry.num-retries": "0"}
MANIFEST_MERGE = "commit.manifest-merge.enabled"
FaultHook = Callable[[str], None]


@dataclass
class CommitResult:
    """One snapshot made (or found landed) for one table."""

    table: str
    seq: int
    batches: int
    files: int
    records: int
    snapshot_id: int | None
    recovered: bool = False
    attempts: int = 1
    duration_ms: float = 0.0
    quarantined: list[str] = field(default_factory=list)


class _SettledTransaction(Transaction):
    """A :class:`Transaction` that works out its staged metadata once per set of updates.

    pyiceberg's ``Transaction.table_metadata`` applies every staged update to the base metadata
    and deep-copies the result on *each* access, and building and committing one append reads
    it a dozen times: measured, that was the largest part of a commit's CPU (a third of it for
    a fresh table, more as snapshots accumulate). The metadata is a frozen model and nothing
    mutates what the property returns, so the same result is handed out again until the
    staged updates change (``_stage`` replaces the ``_updates`` tuple, never mutates it).
    """

    _settled: tuple[tuple[TableUpdate, ...], TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        if not self._updates:  # nothing staged: the base itself (frozen), not a deep copy of it
            return self._table.metadata
        settled = self._settled
        if settled is None or settled[0] is not self._updates:
            settled = (self._updates, super().table_metadata)
            self._settled = settled
        return settled[1]


def without_library_retries(table: Table, *, merge_manifests: bool = False) -> Table:
    """The same table whose transactions do not retry by themselves.

    pyiceberg reads ``commit.retry.num-retries`` (and ``commit.manifest-merge.enabled``) from
    the metadata it holds; overriding them in memory only (never committed) switches its retry
    off for our commits, and its manifest merging on, and leaves the table's real properties,
    which outside writers use, as they are.
    """
    override = {**NO_RETRY, **({MANIFEST_MERGE: "true"} if merge_manifests else {})}
    metadata = table.metadata.model_copy(
        update={"properties": {**table.metadata.properties, **override}}
    )
    return Table(table._identifier, metadata, table.metadata_location, table.io, table.catalog)


class Committer:
    """Commits the pending files of tables; one instance per committer process."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        client: redis.Redis,
        registry: PendingRegistry | None = None,
        fault: FaultHook | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.client = client
        self.registry = registry or PendingRegistry(client)
        self._fault = fault or (lambda point: None)

    # --- public ------------------------------------------------------------------------------------

    def due(self, table: str, now_ms: int | None = None) -> bool:
        """Whether ``table`` is due for a commit now (see :meth:`due_in_ms`)."""
        return self.due_in_ms(table, now_ms) == 0

    def due_in_ms(self, table: str, now_ms: int | None = None) -> int | None:
        """How long until ``table`` is due for a commit: 0 now, None when nothing is pending.

        Due at once with a prepared record to resolve, or when the pending files pass the count
        or bytes threshold. Otherwise ``ICEFLEET_COMMIT_INTERVAL_MS`` paces the table's commits
        from the leading edge: due when the oldest pending batch, *or the table's last commit*,
        is that old. A batch for a table that has not committed for an interval commits at
        once (a trickle, or a fan-out to many quiet tables, is not held back by the interval);
        batches arriving after a commit wait for the interval to pass since it and go
        together. Grouping under load is the same as with a pure age threshold, one snapshot
        per table per interval, and no batch waits longer than the interval.
        """
        stats = self.registry.stats(table)
        if stats.count == 0:
            return 0 if self.registry.prepared(table) is not None else None
        if (
            stats.count >= self.settings.commit_max_files
            or stats.bytes >= self.settings.commit_max_bytes
        ):
            return 0
        last = self._last_commit_ms(table)
        if last is None:
            return 0
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        oldest = stats.oldest_registered_ms or now_ms
        return max(0, min(oldest, last) + self.settings.commit_interval_ms - now_ms)

    def _last_commit_ms(self, table: str) -> int | None:
        """When the table's last commit finished: the newest score of its committed batches
        (:meth:`PendingRegistry.finish_commit`), unless the dedup window dropped them all. A
        part registered empty (all repeats) counts too: it can only postpone, by an interval at
        most, as the age threshold alone would."""
        from common.coord import keys

        newest = self.client.zrange(keys.committed(table), -1, -1, withscores=True)
        return int(newest[0][1]) if newest else None

    def commit_table(self, table: str, *, force: bool = True) -> list[CommitResult]:
        """Recover, then commit what was pending for ``table`` when the lock was taken (in
        snapshots of at most ``commit_max_files`` files). Without ``force``, only when a threshold
        is passed.

        Batches registered while this runs wait for the next call (the follow-up commit task or
        the sweep): a table under a steady stream would otherwise keep its committer forever and
        starve every other table of commits.
        """
        name = TableName.parse(table)
        if not force and not self.due(table):
            return []
        results: list[CommitResult] = []
        with self._lock(table) as lock:
            recovered = self._recover(name, lock)
            if recovered is not None:
                results.append(recovered)
            entries = self.registry.pending_entries(str(name))
            eligible = set(entries)
            while eligible:
                step = self._prepare(name, lock, eligible, entries)
                if step is None:
                    break
                prepared, base = step
                eligible -= set(prepared.batch_ids)
                results.append(
                    self._commit_prepared(
                        name, prepared, lock, recovered=False, base=base, entries=entries
                    )
                )
                # what the next snapshot's prepare sees (nothing else finishes them: the lock)
                entries = {b: e for b, e in entries.items() if b not in set(prepared.batch_ids)}
        return results

    def pending_tables(self) -> set[str]:
        return self.registry.pending_tables() | self._tables_with_prepared()

    # --- steps -------------------------------------------------------------------------------------

    def _lock(self, table: str) -> TableLock:
        return table_lock(self.client, table, self.settings)

    def _tables_with_prepared(self) -> set[str]:
        # Prepared records exist only between prepare and finish: a short list, scanned rarely.
        from common.coord import keys

        pattern = keys.prepared("*")
        return {
            as_text(k)[len(pattern) - 1 :] for k in self.client.scan_iter(match=pattern, count=1000)
        }

    def _recover(self, name: TableName, lock: TableLock) -> CommitResult | None:
        text = self.registry.prepared(str(name))
        if text is None:
            return None
        prepared = PreparedCommit.from_json(text)
        if prepared.to_json() != text:
            # finish_commit drops the record only if it is byte-equal to ours: store it as ours.
            self.registry.prepare(str(name), prepared.to_json(), lock_token=lock.token)
        logger.warning("%s: resolving prepared commit seq %d", name, prepared.seq)
        return self._commit_prepared(name, prepared, lock, recovered=True)

    def _prepare(
        self, name: TableName, lock: TableLock, eligible: set[str], pending: dict[str, str]
    ) -> tuple[PreparedCommit, Table] | None:
        """Choose the batches of the next snapshot among ``pending`` (read under this lock
        hold), store the prepared record, and return it with the table it was numbered from."""
        entries = {b: e for b, e in pending.items() if b in eligible}
        if not entries:
            return None
        limit = self.settings.commit_max_files
        chosen: list[str] = []
        files = 0
        decoded = {b: PendingEntry.from_json(e) for b, e in entries.items()}
        for batch_id in sorted(decoded, key=lambda b: decoded[b].registered_ms):
            n = len(decoded[batch_id].files)
            if chosen and files + n > limit:
                break
            chosen.append(batch_id)
            files += n
        table = self.catalog.load_table(name.parts)
        prepared = PreparedCommit(committed_seq(table) + 1, tuple(chosen), int(time.time() * 1000))
        self.registry.prepare(str(name), prepared.to_json(), lock_token=lock.token)
        self._fault("after_prepare")
        return prepared, table

    def _files_of(
        self, name: TableName, prepared: PreparedCommit, table: Table, entries: dict[str, str]
    ) -> tuple[list[DataFile], int, list[str]]:
        files: list[DataFile] = []
        records = 0
        per_batch: dict[str, list[DataFile]] = {}
        for batch_id in prepared.batch_ids:
            text = entries.get(batch_id)
            if text is None:
                continue  # finished by an earlier run of this same commit
            per_batch[batch_id] = PendingEntry.from_json(text).data_files()
        missing = check_data_files(table.io, [f for fs in per_batch.values() for f in fs])
        broken_paths = {m.path for m in missing}
        quarantined = []
        for batch_id, batch_files in per_batch.items():
            if any(f.file_path in broken_paths for f in batch_files):
                quarantined.append(batch_id)
                continue
            files.extend(batch_files)
            records += sum(f.record_count for f in batch_files)
        for error in missing:
            logger.error("%s: not committing a batch whose file is broken: %s", name, error)
        return files, records, quarantined

    def _commit_prepared(
        self,
        name: TableName,
        prepared: PreparedCommit,
        lock: TableLock,
        *,
        recovered: bool,
        base: Table | None = None,
        entries: dict[str, str] | None = None,
    ) -> CommitResult:
        """Land ``prepared`` (or find it landed) and finish it.

        ``base`` is the table ``prepared`` was just numbered from in this lock hold, and
        ``entries`` the pending entries read in it: a fresh commit passes them, so its first
        attempt costs no second catalog load and no second read of pending. That is safe: no
        commit attempt of ours ran since that load (so no reply can have been lost), the lock
        keeps other committers out, and an outside writer's commit makes the catalog refuse
        ours (it asserts the base snapshot), after which every attempt reloads and re-reads the
        watermark. Recovery passes neither and reads both fresh.
        """
        started = time.perf_counter()
        table = base if base is not None else self.catalog.load_table(name.parts)
        result = CommitResult(str(name), prepared.seq, len(prepared.batch_ids), 0, 0, None)
        result.recovered = recovered
        if committed_seq(table) >= prepared.seq:
            self._verify_landed(name, table, prepared)
            logger.warning("%s: commit seq %d had landed; finishing it", name, prepared.seq)
        else:
            if entries is None:
                entries = self.registry.pending_entries(str(name))
            files, records, quarantined = self._files_of(name, prepared, table, entries)
            result.files, result.records, result.quarantined = len(files), records, quarantined
            if quarantined:
                # Out of the prepared record first, so they are never marked committed.
                kept = tuple(b for b in prepared.batch_ids if b not in set(quarantined))
                prepared = PreparedCommit(prepared.seq, kept, prepared.prepared_ms)
                self.registry.prepare(str(name), prepared.to_json(), lock_token=lock.token)
                self._quarantine(name, quarantined)
                result.batches = len(kept)
            if files:
                table = self._commit_with_retries(
                    name, prepared, files, records, lock, result, base=base
                )
        snapshot = table.current_snapshot()
        result.snapshot_id = snapshot.snapshot_id if snapshot else None
        self.registry.finish_commit(
            str(name),
            list(prepared.batch_ids),
            int(time.time() * 1000),
            prepared_json=prepared.to_json(),
        )
        self._fault("after_cleanup")
        result.duration_ms = (time.perf_counter() - started) * 1000
        logger.info(
            "%s: seq %d committed %d batch(es), %d file(s), %d rows in %.0f ms",
            name,
            prepared.seq,
            result.batches,
            result.files,
            result.records,
            result.duration_ms,
        )
        return result

    def _commit_with_retries(
        self,
        name: TableName,
        prepared: PreparedCommit,
        files: list[DataFile],
        records: int,
        lock: TableLock,
        result: CommitResult,
        *,
        base: Table | None = None,
    ) -> Table:
        attempts = 0
        landed: Table | None = None

        def attempt() -> None:
            nonlocal attempts, landed
            attempts += 1
            lock.check()
            # the first attempt may use the table the seq was chosen from (_commit_prepared)
            table = (
                base if attempts == 1 and base is not None else self.catalog.load_table(name.parts)
            )
            if committed_seq(table) >= prepared.seq:
                self._verify_landed(name, table, prepared)
                landed = table  # an earlier attempt landed although its reply was lost
                return
            landed = self._commit_once(name, table, prepared, files, records)

        policy = RetryPolicy(
            "commit",
            attempts=self.settings.commit_attempts,
            base_s=self.settings.retry_base_ms / 1000,
            max_wait_s=max(1.0, self.settings.retry_base_ms / 100),
            # a conflict or a lost reply: the watermark check in attempt() decides what to do
            retry_on=lambda exc: isinstance(exc, RetryableError | CommitStateUnknownError),
        )
        policy.call(f"commit of seq {prepared.seq} to {name}", attempt)
        result.attempts = attempts
        assert landed is not None
        return landed

    @staticmethod
    def _verify_landed(name: TableName, table: Table, prepared: PreparedCommit) -> None:
        """The commit that landed under the prepared seq is the prepared one, or stop."""
        found, digest = landed_digest(table, prepared.seq)
        if not found:
            raise CommitVerificationError(
                str(name),
                prepared.seq,
                f"the table is at seq {committed_seq(table)} and records seq {prepared.seq} "
                "nowhere any more",
            )
        if digest is None:  # landed before commits carried a digest: nothing to compare
            return
        if digest != prepared.digest:
            raise CommitVerificationError(
                str(name),
                prepared.seq,
                f"its snapshot carries batches digest {digest}, the prepared record's "
                f"{len(prepared.batch_ids)} batch(es) digest to {prepared.digest}",
            )

    def _commit_once(
        self,
        name: TableName,
        table: Table,
        prepared: PreparedCommit,
        files: list[DataFile],
        records: int,
    ) -> Table:
        seq = str(prepared.seq)
        summary = {
            SEQ_PROPERTY: seq,
            BATCHES_PROPERTY: prepared.digest,
            "icefleet.batches": str(len(prepared.batch_ids)),
            "icefleet.records": str(records),
        }
        merge = table.metadata.properties.get(MANIFEST_MERGE, "true").strip().lower() != "false"
        tx = _SettledTransaction(without_library_retries(table, merge_manifests=merge))
        update = tx.update_snapshot(snapshot_properties=summary)
        # A merge append: one append snapshot like a fast append, but once a table has
        # `commit.manifest.min-count-to-merge` (100) small manifests it merges them, so commit
        # time stays flat as a table ages instead of growing with one manifest per commit
        # (benchmarks/README.md). `commit.manifest-merge.enabled=false` on a table opts out.
        with update.merge_append() if merge else update.fast_append() as append:
            for data_file in files:
                append.append_data_file(data_file)
        # Staged after the snapshot (same metadata in the end): the snapshot is built on the
        # base metadata as it is, with no staged update to apply and copy first.
        tx.set_properties({SEQ_PROPERTY: seq, BATCHES_PROPERTY: prepared.digest})
        self._fault("before_catalog_commit")
        try:
            committed = tx.commit_transaction()
        except CommitFailedException as exc:
            raise CommitConflictError(str(name), str(exc)) from exc
        except CommitStateUnknownException as exc:
            raise CommitStateUnknownError(str(name), str(exc)) from exc
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise CommitStateUnknownError(str(name), f"{type(exc).__name__}: {exc}") from exc
        self._fault("after_catalog_commit")
        return committed

    def _quarantine(self, name: TableName, batch_ids: list[str]) -> None:
        """Take batches whose files are gone out of pending, and say so in the dead letters."""
        from common.coord.deadletters import DeadLetterStore

        entries = self.registry.pending_entries(str(name))
        records = []
        for batch_id in batch_ids:
            records.append(
                _Quarantined(
                    batch_id,
                    0,
                    "data file missing or wrong size at commit",
                    None,
                    entries.get(batch_id, "").encode(),
                )
            )
        DeadLetterStore(self.client).add(records, table=str(name))
        self.registry.remove(str(name), batch_ids)


@dataclass(frozen=True)
class _Quarantined:
    batch_id: str
    position: int
    reason: str
    attribute: str | None
    raw: bytes


__all__ = [
    "BATCHES_PROPERTY",
    "SEQ_PROPERTY",
    "CommitResult",
    "Committer",
    "MissingDataFileError",
    "PreparedCommit",
    "batches_digest",
    "committed_seq",
    "landed_digest",
    "without_library_retries",
]
