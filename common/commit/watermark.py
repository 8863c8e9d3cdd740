"""The commit watermark and what a commit is recorded with, in the table and in Redis.

Each snapshot icefleet's committer makes carries, in its summary and in the table properties
(which survive snapshot expiry), ``icefleet.commit-seq`` (the watermark) and
``icefleet.commit-batches`` (:func:`batches_digest` of the batch ids it committed). Before the
catalog is touched, the committer stores a :class:`PreparedCommit` in Redis; recovery compares the
two (:func:`landed_digest`) before it clears pending (:mod:`common.commit.committer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import xxhash
from pyiceberg.table import Table

SEQ_PROPERTY = "icefleet.commit-seq"
BATCHES_PROPERTY = "icefleet.commit-batches"  # digest of the batch ids of that commit


@dataclass(frozen=True)
class PreparedCommit:
    """What a committer is about to commit: written to Redis before the catalog is touched."""

    seq: int
    batch_ids: tuple[str, ...]
    prepared_ms: int

    def to_json(self) -> str:
        return orjson.dumps(
            {"seq": self.seq, "batch_ids": list(self.batch_ids), "prepared_ms": self.prepared_ms}
        ).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> PreparedCommit:
        raw = orjson.loads(text)
        return cls(int(raw["seq"]), tuple(raw["batch_ids"]), int(raw["prepared_ms"]))

    @property
    def digest(self) -> str:
        """16 hex digits naming the set of batch ids: what the snapshot carries."""
        return batches_digest(self.batch_ids)


def batches_digest(batch_ids: Iterable[str]) -> str:
    """A short digest of a set of batch ids (order does not matter)."""
    return xxhash.xxh3_64_hexdigest("\n".join(sorted(batch_ids)).encode("utf-8", "surrogatepass"))


def landed_digest(table: Table, seq: int) -> tuple[bool, str | None]:
    """Whether the table records commit ``seq`` (its snapshot, or the table property when that
    seq is the last one), and the batches digest recorded with it (None: written before
    digests existed)."""
    snapshot = table.current_snapshot()
    while snapshot is not None:
        extra = snapshot.summary.additional_properties if snapshot.summary else {}
        value = extra.get(SEQ_PROPERTY)
        if value is not None and int(value) == seq:
            return True, extra.get(BATCHES_PROPERTY)
        if (value is not None and int(value) < seq) or snapshot.parent_snapshot_id is None:
            break
        snapshot = table.metadata.snapshot_by_id(snapshot.parent_snapshot_id)
    properties = table.metadata.properties
    if properties.get(SEQ_PROPERTY) == str(seq):
        return True, properties.get(BATCHES_PROPERTY)
    return False, None


def committed_seq(table: Table) -> int:
    """The commit watermark: the highest ``icefleet.commit-seq`` the table carries (0 if none)."""
    best = int(table.metadata.properties.get(SEQ_PROPERTY, "0") or 0)
    snapshot = table.current_snapshot()
    while snapshot is not None:
        summary = snapshot.summary
        value = summary.additional_properties.get(SEQ_PROPERTY) if summary else None
        if value is not None:
            return max(best, int(value))
        if snapshot.parent_snapshot_id is None:
            break
        snapshot = table.metadata.snapshot_by_id(snapshot.parent_snapshot_id)
    return best


__all__ = [
    "BATCHES_PROPERTY",
    "SEQ_PROPERTY",
    "PreparedCommit",
    "batches_digest",
    "committed_seq",
    "landed_digest",
]
