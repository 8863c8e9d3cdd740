"""The swap of a compaction: old data files replaced by new ones in ONE ``replace`` snapshot.

Run under the table lock. Right before each attempt the table is refreshed and every input must
still be live (else :class:`~common.errors.ConcurrentModificationError`, nothing committed); the
snapshot has the operation ``replace`` (no data changed: incremental readers skip it) and
pyiceberg's retry is off, so a conflict with an outside append is checked and committed again
here, with the same outputs. It carries no ``icefleet.commit-seq``, only
``icefleet.base-commit-seq``, the watermark it was based on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    ValidationException,
)
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Summary
from pyiceberg.table.update.snapshot import _OverwriteFiles
from pyiceberg.typedef import EMPTY_DICT

from common.commit.committer import committed_seq, without_library_retries
from common.errors import (
    CommitStateUnknownError,
    ConcurrentModificationError,
    RetriesExhaustedError,
)
from common.maintenance.deletes import live_data_files

logger = logging.getLogger(__name__)

BASE_SEQ_PROPERTY = "icefleet.base-commit-seq"
SWAP_ATTEMPTS = 5


class _ReplaceFiles(_OverwriteFiles):
    """pyiceberg's overwrite producer, recording the snapshot as a ``replace``.

    pyiceberg 0.12 has no replace API and its summary code accepts only append, overwrite and
    delete; the totals are the same for a replace, so they are computed as for an overwrite and
    the operation is set afterwards. Its concurrency checks already treat ``replace`` as Java does.
    """

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        summary = super()._summary(snapshot_properties)
        return Summary(Operation.REPLACE, **summary.additional_properties)


def swap_data_files(
    table: Table,
    old: Collection[DataFile],
    new: Collection[DataFile],
    *,
    snapshot_properties: dict[str, str] | None = None,
    check: Callable[[], None] | None = None,
    attempts: int = SWAP_ATTEMPTS,
) -> Table:
    """Replace the data files ``old`` by ``new`` in ONE ``replace`` snapshot; the table after.

    Right before each attempt the table is refreshed and every old file must still be live, else
    :class:`ConcurrentModificationError` (nothing committed). ``check`` (e.g.
    :meth:`~common.coord.locks.TableLock.check`) runs right before each commit. The snapshot carries
    the commit watermark it was based on as ``icefleet.base-commit-seq``; the watermark itself
    is unchanged.
    """
    name = ".".join(table.name())
    for attempt in range(1, attempts + 1):
        table = table.refresh()
        live = live_data_files(table)
        gone = sorted(f.file_path for f in old if f.file_path not in live)
        if gone:
            raise ConcurrentModificationError(name, gone)
        base_seq = committed_seq(table)
        props = {**(snapshot_properties or {}), BASE_SEQ_PROPERTY: str(base_seq)}
        tx = without_library_retries(table).transaction()
        with _ReplaceFiles(
            operation=Operation.OVERWRITE, transaction=tx, io=table.io, snapshot_properties=props
        ) as replace:
            for data_file in old:
                replace.delete_data_file(live[data_file.file_path])
            for data_file in new:
                replace.append_data_file(data_file)
        if check is not None:
            check()
        try:
            committed = tx.commit_transaction()
        except ValidationException as exc:
            raise ConcurrentModificationError(name, sorted(f.file_path for f in old)) from exc
        except CommitFailedException as exc:
            logger.info("%s: swap conflicted (attempt %d): %s", name, attempt, exc)
            if attempt == attempts:
                raise RetriesExhaustedError(f"swap of files in {name}", attempt, exc) from exc
            continue
        except CommitStateUnknownException as exc:
            raise CommitStateUnknownError(name, str(exc)) from exc
        if committed_seq(committed) != base_seq:  # pragma: no cover - a broken invariant
            logger.error("%s: the commit watermark moved across a swap", name)
        return committed
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["BASE_SEQ_PROPERTY", "SWAP_ATTEMPTS", "swap_data_files"]
