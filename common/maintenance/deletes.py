"""Table changes that remove data files, safe against concurrent writers and each other.

:func:`remove_data_files` takes files out of a table by path (a delete, or the removal half of a
compaction). Whoever removes a file second must learn that it lost, instead of committing an
empty change or a change computed from a stale table: every attempt re-reads the table (under the
table lock when one is given), checks that each path is still live in the current snapshot and
raises :class:`~common.errors.ConcurrentModificationError` if one is not, and commits with
pyiceberg's own retry off, asserting the snapshot the check was made on. A commit that loses that
race to an append is simply checked and tried again; one that loses it to another removal of the
same file fails.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext

from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.table import Table

from common.commit.committer import without_library_retries
from common.errors import ConcurrentModificationError, RetriesExhaustedError

logger = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 5


def live_data_files(table: Table) -> dict[str, DataFile]:
    """The data files of ``table``'s current snapshot, by path."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return {}
    live: dict[str, DataFile] = {}
    for manifest in snapshot.manifests(table.io):
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            if entry.data_file.content == DataFileContent.DATA:
                live[entry.data_file.file_path] = entry.data_file
    return live


def remove_data_files(
    table: Table,
    paths: Collection[str],
    *,
    lock: AbstractContextManager[object] | None = None,
    snapshot_properties: dict[str, str] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> Table:
    """Remove the data files at ``paths`` from ``table`` in one snapshot; return the new table.

    Raises :class:`ConcurrentModificationError` (and changes nothing) when any path is not live
    in the table as it is at commit time: already removed by someone else, or never there.
    ``lock`` (e.g. a :class:`~common.coord.locks.TableLock`, not yet acquired) is held for the whole
    operation; without it the catalog's compare-and-swap alone keeps concurrent removals apart.
    """
    wanted = set(paths)
    name = ".".join(table.name())
    if not wanted:
        return table
    with lock if lock is not None else nullcontext():
        for attempt in range(1, attempts + 1):
            table = table.refresh()
            live = live_data_files(table)
            gone = sorted(wanted - live.keys())
            if gone:
                raise ConcurrentModificationError(name, gone)
            tx = without_library_retries(table).transaction()
            with tx.update_snapshot(
                snapshot_properties=snapshot_properties or {}
            ).overwrite() as ow:
                for path in sorted(wanted):
                    ow.delete_data_file(live[path])
            try:
                committed = tx.commit_transaction()
            except ValidationException as exc:
                raise ConcurrentModificationError(name, sorted(wanted)) from exc
            except CommitFailedException as exc:
                logger.info("%s: removal conflicted (attempt %d): %s", name, attempt, exc)
                if attempt == attempts:
                    raise RetriesExhaustedError(
                        f"removal of {len(wanted)} file(s) from {name}", attempt, exc
                    ) from exc
                continue
            logger.info("%s: removed %d data file(s)", name, len(wanted))
            return committed
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["live_data_files", "remove_data_files"]


def delete_rows(
    table: Table,
    where: str,
    *,
    lock: AbstractContextManager[object] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> tuple[int, Table]:
    """Delete the rows matching ``where`` (a pyiceberg row filter, e.g. ``subject = 'user-42'``)
    with pyiceberg's copy-on-write ``delete``; return how many rows went, and the table after.

    Held under ``lock`` (not yet acquired) like :func:`remove_data_files`, with pyiceberg's own
    retry off: a conflict with an outside append is planned and tried again on the fresh table;
    a file that is no longer live when the delete commits (pyiceberg validates each one it
    removes) raises :class:`ConcurrentModificationError`. ``where`` is checked against the schema
    first: ValueError says what is wrong with it. The snapshots carry the commit watermark they
    were based on (``icefleet.base-commit-seq``), never a new ``icefleet.commit-seq``.
    """
    import warnings

    from pyiceberg.expressions import parser
    from pyiceberg.expressions.visitors import bind

    from common.commit.committer import committed_seq
    from common.lake.integrity import verified

    name = ".".join(table.name())
    try:
        expression = parser.parse(where)
        bind(table.schema(), expression, case_sensitive=True)
    except Exception as exc:  # pyparsing's ParseException, ValueError for an unknown column
        raise ValueError(f"invalid row filter {where!r}: {exc}") from None
    with lock if lock is not None else nullcontext():
        for attempt in range(1, attempts + 1):
            table = table.refresh()
            base = table.current_snapshot()
            if base is None:
                return 0, table
            properties = {
                "icefleet.operation": "delete",
                "icefleet.base-commit-seq": str(committed_seq(table)),
            }
            # pages checked as the delete reads the files it rewrites: a corrupt file fails it
            # (CorruptDataFileError) instead of being copied, wrong values and all
            target = verified(without_library_retries(table))
            check = getattr(lock, "check", None)
            if check is not None:
                check()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "did not match any records" is a result
                    target.delete(expression, snapshot_properties=properties)
            except ValidationException as exc:  # "Missing required files to delete: a, b"
                paths = str(exc).split(": ", 1)[-1].split(", ")
                raise ConcurrentModificationError(name, paths) from exc
            except CommitFailedException as exc:
                logger.info("%s: delete conflicted (attempt %d): %s", name, attempt, exc)
                if attempt == attempts:
                    raise RetriesExhaustedError(f"delete from {name}", attempt, exc) from exc
                continue
            removed = 0
            snapshot = target.current_snapshot()
            while snapshot is not None and snapshot.snapshot_id != base.snapshot_id:
                summary = snapshot.summary.additional_properties if snapshot.summary else {}
                removed += int(summary.get("deleted-records", 0))
                removed -= int(summary.get("added-records", 0))
                parent = snapshot.parent_snapshot_id
                snapshot = target.metadata.snapshot_by_id(parent) if parent is not None else None
            logger.info("%s: deleted %d row(s) where %s", name, removed, where)
            return removed, target
    raise AssertionError("unreachable")  # pragma: no cover


__all__ += ["delete_rows"]
