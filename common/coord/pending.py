"""Pending batches, prepared commits and the dedup memory of committed batches, in Redis.

Writers :meth:`~PendingRegistry.register` the files of a batch under its id; the committer reads
:meth:`~PendingRegistry.pending_entries`, writes a :meth:`~PendingRegistry.prepare` record, commits
one snapshot, then :meth:`~PendingRegistry.finish_commit` moves the ids from *pending* to
*committed* in one atomic step. Because registration refuses an id that is pending or committed, a
batch redelivered after its commit is not committed twice (within the dedup window kept by
:meth:`~PendingRegistry.trim_committed`).

Every operation that touches more than one key is one Lua script, so the invariant "a table is in
``pending_tables`` exactly when its pending hash is non-empty" holds at every instant.
An entry is the JSON of a :class:`PendingEntry` (the one codec: the writer encodes it, the
committer and :meth:`~PendingRegistry.stats` decode it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis
from pyiceberg.manifest import DataFile

from common.coord import keys
from common.coord.claims import EventClaims
from common.coord.replies import as_text
from common.errors import LockLostError
from common.lake.datafiles import data_file_from_dict, data_file_to_dict

# KEYS: pending, committed, pending_tables, duplicates; ARGV: batch_id, entry (empty: nothing to
# commit), table, duplicates dropped, conflicting → 1 registered, 0 duplicate. An empty part (all
# its events were repeats) is remembered as committed at once. The duplicate counters move with
# the registration, which happens once per batch and table: a redelivery never counts again.
_REGISTER_LUA = """
if redis.call('zscore', KEYS[2], ARGV[1]) then
  return 0
end
if ARGV[2] == '' then
  if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then
    return 0
  end
  local now = redis.call('TIME')
  redis.call('zadd', KEYS[2], 'NX', now[1] * 1000 + math.floor(now[2] / 1000), ARGV[1])
else
  if redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return 0
  end
  redis.call('sadd', KEYS[3], ARGV[3])
end
if ARGV[4] ~= '0' then
  redis.call('hincrby', KEYS[4], ARGV[3] .. ':dropped', ARGV[4])
end
if ARGV[5] ~= '0' then
  redis.call('hincrby', KEYS[4], ARGV[3] .. ':conflicting', ARGV[5])
end
return 1
"""

# KEYS: pending, committed, prepared, pending_tables;
# ARGV: table, committed_ms, only_if ('1': drop the prepared record only if it equals the next
# argument, '0': drop it whatever it is), expected prepared record, batch ids...
# ZADD NX keeps the first commit time when the call is repeated.
_FINISH_LUA = """
for i = 5, #ARGV do
  redis.call('hdel', KEYS[1], ARGV[i])
  redis.call('zadd', KEYS[2], 'NX', ARGV[2], ARGV[i])
end
if ARGV[3] == '0' or redis.call('get', KEYS[3]) == ARGV[4] then
  redis.call('del', KEYS[3])
end
if redis.call('hlen', KEYS[1]) == 0 then
  redis.call('srem', KEYS[4], ARGV[1])
end
return 0
"""

# KEYS: prepared, lock; ARGV: record, lock token → 1 stored, 0 the lock does not hold that token
_PREPARE_FENCED_LUA = """
if redis.call('get', KEYS[2]) ~= ARGV[2] then
  return 0
end
redis.call('set', KEYS[1], ARGV[1])
return 1
"""

# KEYS: pending, pending_tables; ARGV: table, batch ids... → number of entries removed
_REMOVE_LUA = """
local removed = 0
for i = 2, #ARGV do
  removed = removed + redis.call('hdel', KEYS[1], ARGV[i])
end
if redis.call('hlen', KEYS[1]) == 0 then
  redis.call('srem', KEYS[2], ARGV[1])
end
return removed
"""


@dataclass(frozen=True)
class PendingStats:
    """What waits to be committed in one table."""

    count: int
    records: int
    bytes: int
    oldest_registered_ms: int | None


def _int_field(entry: Mapping[str, Any], name: str) -> int | None:
    value = entry.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class PendingEntry:
    """What the registry keeps for one batch of one table: its files, ready to commit.

    ``files`` are the DataFiles as JSON objects (:mod:`common.lake.datafiles`), built by the writer
    from the footers it wrote, so the committer never reads a Parquet file.
    """

    batch_id: str
    files: tuple[dict[str, Any], ...]
    records: int
    size_bytes: int
    registered_ms: int

    @classmethod
    def of(cls, batch_id: str, data_files: Sequence[DataFile]) -> PendingEntry:
        return cls(
            batch_id=batch_id,
            files=tuple(data_file_to_dict(f) for f in data_files),
            records=sum(f.record_count for f in data_files),
            size_bytes=sum(f.file_size_in_bytes for f in data_files),
            registered_ms=int(time.time() * 1000),
        )

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "batch_id": self.batch_id,
                "files": list(self.files),
                "records": self.records,
                "bytes": self.size_bytes,
                "registered_ms": self.registered_ms,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str | bytes, *, strict: bool = True) -> PendingEntry:
        """Decode an entry. One that is not an object with a list of ``files`` raises
        ``ValueError`` (the committer must not commit a batch as empty), unless ``strict`` is off:
        then what is missing reads as empty (for counts such as :meth:`PendingRegistry.stats`)."""
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError:
            raw = None
        files = raw.get("files") if isinstance(raw, dict) else None
        if strict and not isinstance(files, list):
            raise ValueError(
                f"not a pending entry: {bytes(text[:100]) if isinstance(text, bytes) else text[:100]!r}"
            )
        if not isinstance(raw, dict):
            raw = {}
        return cls(
            batch_id=str(raw.get("batch_id", "")),
            files=tuple(f for f in files if isinstance(f, dict)) if isinstance(files, list) else (),
            records=_int_field(raw, "records") or 0,
            size_bytes=_int_field(raw, "bytes") or 0,
            registered_ms=_int_field(raw, "registered_ms") or 0,
        )

    def data_files(self) -> list[DataFile]:
        return [data_file_from_dict(d) for d in self.files]


class PendingRegistry:
    """The Redis side of the commit path for every table; cheap to create, one per client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._register = client.register_script(_REGISTER_LUA)
        self._finish = client.register_script(_FINISH_LUA)
        self._remove = client.register_script(_REMOVE_LUA)
        self._prepare_fenced = client.register_script(_PREPARE_FENCED_LUA)
        #: the writers' claims on event identities, kept beside the registry they complete
        self.claims = EventClaims(client)

    # --- writers ----------------------------------------------------------------------------------

    def register(
        self,
        table: str,
        batch_id: str,
        entry_json: str,
        duplicates: tuple[int, int] = (0, 0),
    ) -> bool:
        """Record a written batch as pending; ``False`` (and no change) if it is already known.

        Known means pending, or committed within the dedup window: a redelivered batch is
        harmless either way. ``duplicates`` (dropped, conflicting) are the repeats of events this
        part of the batch left out (common/coord/claims.py), counted if it is registered. An empty
        ``entry_json`` registers a part with nothing to commit (all its events were repeats).
        """
        registered = self._register(
            keys=[
                keys.pending(table),
                keys.committed(table),
                keys.pending_tables(),
                keys.duplicates(),
            ],
            args=[batch_id, entry_json, table, *duplicates],
        )
        return bool(registered)

    def duplicates(self) -> dict[str, tuple[int, int]]:
        """Per table, (duplicates dropped, conflicting duplicates dead-lettered) so far."""
        out: dict[str, tuple[int, int]] = {}
        raw = cast(Mapping[Any, Any], self._client.hgetall(keys.duplicates()))
        for name, count in raw.items():
            table, _, kind = as_text(name).rpartition(":")
            dropped, conflicting = out.get(table, (0, 0))
            if kind == "dropped":
                dropped = int(count)
            elif kind == "conflicting":
                conflicting = int(count)
            out[table] = (dropped, conflicting)
        return out

    def is_known(self, table: str, batch_id: str) -> bool:
        """Whether the batch is pending or committed (within the dedup window)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hexists(keys.pending(table), batch_id)
        pipe.zscore(keys.committed(table), batch_id)
        in_pending, committed_ms = pipe.execute()
        return bool(in_pending) or committed_ms is not None

    # --- readers ----------------------------------------------------------------------------------

    def pending_entries(self, table: str) -> dict[str, str]:
        """Every pending batch of the table: batch id → entry JSON."""
        raw = cast(Mapping[Any, Any], self._client.hgetall(keys.pending(table)))
        return {as_text(batch_id): as_text(entry) for batch_id, entry in raw.items()}

    def pending_tables(self) -> set[str]:
        """The tables that have at least one pending batch."""
        members = cast(Iterable[Any], self._client.smembers(keys.pending_tables()))
        return {as_text(table) for table in members}

    def stats(self, table: str) -> PendingStats:
        """Count, records, bytes and the oldest registration time of the table's pending batches.

        Scans the hash incrementally (HSCAN), so a large backlog does not block Redis. Entries
        that are not JSON objects, or lack a field, count as a batch with nothing in that field.
        """
        count = records = size = 0
        oldest: int | None = None
        for _batch_id, entry_json in self._client.hscan_iter(keys.pending(table), count=500):
            entry = PendingEntry.from_json(entry_json, strict=False)
            count += 1
            records += entry.records
            size += entry.size_bytes
            if entry.registered_ms and (oldest is None or entry.registered_ms < oldest):
                oldest = entry.registered_ms
        return PendingStats(count=count, records=records, bytes=size, oldest_registered_ms=oldest)

    # --- committer --------------------------------------------------------------------------------

    def prepare(self, table: str, record_json: str, lock_token: str | None = None) -> None:
        """Store the prepared-commit record (seq, batch ids) before the catalog commit.

        With ``lock_token`` (the committer's :class:`~common.coord.locks.TableLock` token) the record is
        stored only while the table lock still holds that token, else :class:`LockLostError` is
        raised: a committer that lost its lock never overwrites the record of the new owner.
        """
        if lock_token is None:
            self._client.set(keys.prepared(table), record_json)
            return
        stored = self._prepare_fenced(
            keys=[keys.prepared(table), keys.lock(table)], args=[record_json, lock_token]
        )
        if not stored:
            raise LockLostError(keys.lock(table))

    def prepared(self, table: str) -> str | None:
        """The prepared-commit record of an unfinished commit, or ``None``."""
        record = self._client.get(keys.prepared(table))
        return None if record is None else as_text(record)

    def finish_commit(
        self,
        table: str,
        batch_ids: Iterable[str],
        committed_ms: int,
        prepared_json: str | None = None,
    ) -> None:
        """Atomically move the batches from pending to committed and drop the prepared record.

        With ``prepared_json``, the prepared record is dropped only if it is still that text: a
        stale committer (one that lost its lock) finishing late never deletes the record of the
        commit a newer committer has prepared since. Idempotent: repeating it changes nothing (the
        first commit time is kept). Ids that are not pending are still remembered as committed.
        """
        only_if = "0" if prepared_json is None else "1"
        self._finish(
            keys=[
                keys.pending(table),
                keys.committed(table),
                keys.prepared(table),
                keys.pending_tables(),
            ],
            args=[table, int(committed_ms), only_if, prepared_json or "", *batch_ids],
        )

    def abandon_prepared(self, table: str) -> None:
        """Drop the prepared record (its commit is known not to have landed)."""
        self._client.delete(keys.prepared(table))

    def trim_committed(self, table: str, older_than_ms: int) -> int:
        """Forget committed batches whose commit time is before ``older_than_ms``; return how many.

        After this, a redelivery of such a batch would be registered again: keep the window
        longer than any redelivery can be late.
        """
        removed = self._client.zremrangebyscore(keys.committed(table), "-inf", f"({older_than_ms}")
        return int(removed)

    def remove(self, table: str, batch_ids: Iterable[str]) -> int:
        """Drop pending batches without committing them (e.g. dead-lettered); return how many."""
        removed = self._remove(
            keys=[keys.pending(table), keys.pending_tables()],
            args=[table, *batch_ids],
        )
        return int(removed)
