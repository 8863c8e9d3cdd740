"""Partial progress: a batch that cannot be written in time is split, and still lands exactly once.

A write task has a time limit (``ICEFLEET_WRITE_TIMEOUT_S``, Celery's soft limit). The writer
writes a batch in *chunks* of events (:func:`chunk_events`), checking between chunks whether the
next one still fits before the deadline (:func:`deadline_for`) and whether the worker is shutting
down. When it must stop after ``k`` of the batch's ``n`` valid events (or Celery's soft limit
interrupts a chunk, whose files are then abandoned), the batch is *split* at ``k``:

1. the split point is recorded in Redis, once and for all: ``icefleet:split:<batch id>`` = ``k``
   (:class:`SplitRecords`, first writer wins, kept as long as the dedup window);
2. the files of events ``[0, k)`` are registered as pending under the batch's own id, per table,
   as a whole batch is;
3. events ``[k, n)`` are enqueued again as a *child* batch ``<batch id>~<k>``
   (:func:`~common.wire.split_child_id`), with the parent's enqueue time, so its rows carry the same
   ``_ingested_at``; a child may split in turn (``<id>~<k>~<m>``);
4. the parent leaves ``icefleet:outstanding`` (the child is in it first) and its task is acked.

Written plus remaining is the whole batch, and no event is in both parts. **Redelivery** of the
parent at any point after step 1 (its worker died, the soft limit hit a Redis call, the producer
sent the same batch id again) reads the record and does steps 2 to 4 again for ``[0, k)`` only:
tables whose part is already registered or committed are skipped, the others are written again
(same events, same paths), and the child is enqueued again, which is harmless: the child is a
batch like any other, deduplicated by its own id (and by its own split record if it split).
Without the record a redelivery would write the whole batch again under the parent's id, and the
tables that got nothing before ``k`` would receive the child's events a second time.

Two attempts of one batch running at once (a producer resending while the first still runs, a
redelivery racing a slow first attempt) may disagree on the cut: the record is taken atomically,
and the one that finds a different split point raises :class:`SplitConflictError` (retryable) and
follows the record on its next delivery. An attempt that wrote the whole batch records its cut
too, :data:`WHOLE` (no child), before it registers: without that, an attempt splitting at ``k`` after
the whole one registered would find its own part refused (already registered) and still hand
back a child carrying events ``[k, n)``, which the whole registration already holds. (Per-event
claims do not catch that child: its events have the same place, lineage root and offset, as
the whole attempt's, which is how a legitimate child of a split finds its parent's claims.)

Ids: producer splits are ``<id>:<n>`` (common/ingest/producer.py), writer splits ``<id>~<k>``, so the two
never collide with each other; a producer's batch id ending in ``~<digits>`` could collide with a
writer's child of the same prefix, so the producer refuses it (``InvalidBatchIdError``).

Offsets count the batch's *valid* events in payload order; events that fail validation are
dead-lettered by the parent, so a child carries only valid events.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis

from common.coord import keys
from common.errors import RetryableError

#: Stop starting new chunks at this fraction of the time limit: registration and the child's
#: enqueue need a moment, and the soft limit must not hit them.
DEADLINE_FRACTION = 0.8
#: A full producer batch (``ICEFLEET_BATCH_MAX_EVENTS``) is written in this many chunks.
CHUNKS_PER_BATCH = 2
#: Each redelivery of a batch that did not finish halves the chunk, down to this.
MIN_CHUNK_EVENTS = 10

#: The cut an attempt that wrote a batch whole records (no split ever leaves nothing written).
WHOLE = 0

# KEYS: split record; ARGV: offset, ttl seconds → the offset in effect (an earlier one wins)
_RECORD_LUA = """
local existing = redis.call('get', KEYS[1])
if existing then
  return existing
end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""


class SplitConflictError(RetryableError):
    """Raised when another attempt of the same batch split it at a different point first.

    Nothing was registered by this attempt; its next delivery follows the recorded split.
    """

    def __init__(self, batch_id: str, wanted: int, recorded: int) -> None:
        self.batch_id = batch_id
        self.wanted = wanted
        self.recorded = recorded
        theirs = "wrote it whole" if recorded == WHOLE else f"split it at {recorded}"
        super().__init__(
            f"batch {batch_id[:200]!r}: wanted to split at {wanted}, but another attempt {theirs}"
        )


def split_key(batch_id: str) -> str:
    """``icefleet:split:<batch id>``: where a batch's split point is recorded (string, TTL)."""
    return keys.split(batch_id)


def chunk_events(batch_max_events: int, attempt: int = 1) -> int:
    """How many events the writer writes between two deadline checks.

    A full producer batch takes :data:`CHUNKS_PER_BATCH` chunks; a batch delivered again after it
    did not finish (``attempt`` > 1: timed out, or its worker died) gets chunks half as large per
    extra attempt, so a batch too slow for the time limit still makes progress.
    """
    base = max(MIN_CHUNK_EVENTS, math.ceil(batch_max_events / CHUNKS_PER_BATCH))
    return max(MIN_CHUNK_EVENTS, base >> min(max(attempt - 1, 0), 30))


def deadline_for(write_timeout_s: float, started: float | None = None) -> float:
    """The monotonic time after which a write task starts no new chunk."""
    began = time.monotonic() if started is None else started
    return began + write_timeout_s * DEADLINE_FRACTION


@dataclass(frozen=True)
class Remainder:
    """What a split batch hands back: the events from ``offset`` on, as a child batch."""

    batch_id: str  # the child's id
    offset: int  # valid events of the parent before it
    events: int
    payload: str  # NDJSON, one event per line, as received


class SplitRecords:
    """The split points of batches, in Redis; kept ``ttl_s`` (the dedup window)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self.ttl_s = max(1, int(ttl_s))
        self._record = client.register_script(_RECORD_LUA)

    def get(self, batch_id: str) -> int | None:
        """Where an earlier attempt split the batch, or None (none did, or one wrote it whole)."""
        value = self._client.get(split_key(batch_id))
        return None if value is None or int(value) == WHOLE else int(value)

    def record(self, batch_id: str, offset: int) -> int:
        """Record a split at ``offset`` (:data:`WHOLE`: written whole) unless a cut is recorded;
        return the one in effect."""
        if offset < 0:
            raise ValueError(f"a split must leave something written, got offset {offset}")
        return int(self._record(keys=[split_key(batch_id)], args=[offset, self.ttl_s]))


__all__ = [
    "CHUNKS_PER_BATCH",
    "DEADLINE_FRACTION",
    "MIN_CHUNK_EVENTS",
    "WHOLE",
    "Remainder",
    "SplitConflictError",
    "SplitRecords",
    "chunk_events",
    "deadline_for",
    "split_key",
]
