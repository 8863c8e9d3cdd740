"""Exactly once per CloudEvent: claims on event identities, per table, in Redis.

CloudEvents 1.0 identifies an event by ``source`` and ``id``. Per table, an event whose identity
already landed, or is pending, within the dedup window (``ICEFLEET_DEDUP_WINDOW_S``) is not written
again, whichever batch, producer, gateway request, replay or redelivery carries it. On by
default; ``ICEFLEET_DEDUPE=off`` or ``ICEFLEET_DEDUPE_TABLES=ns.table=off`` turns it off for
producers that reuse ids on purpose.

**The protocol.** The batch protocol already makes each *position* of a batch land once: a batch id
is bound to its content (:mod:`common.coord.bindings`), registration admits a batch id once per
table (:mod:`common.coord.pending`), and a writer that splits a batch hands the events from
offset ``k`` on to the child ``<id>~<k>`` (:mod:`common.write.partial`). Claims add identities on
top of positions:

1. **Claim before registering.** A writer about to write events ``[0, limit)`` of a batch (``limit``:
   the recorded split point, else all) claims, per table, the identity of each of them in one
   Lua script, atomically: an identity nobody holds is claimed for the event's *place*, the root
   of the batch's lineage and the event's position in it (:func:`common.wire.lineage`:
   ``orders~500`` event 3 is ``orders`` event 503), with the digest of its bytes. The script
   answers per event: ``n`` (claimed now) or ``m`` (already claimed for this very place: a
   redelivery, a racing attempt of the same batch, or the split child of the batch that claimed
   it), both written; ``d`` (claimed for another place, same bytes: a duplicate, dropped and
   counted) or ``c`` (other bytes: two events under one identity, a producer bug someone must
   see: dead-lettered with the reason, counted). A repeat inside one batch is judged against its
   first occurrence the same way, before the script runs. "Before" means before registering:
   the compiled path claims while it writes its first chunk and, when the verdicts hold a
   repeat, deletes what it wrote and writes the batch again without it
   (:meth:`common.write.batch_writer.BatchWriter.write`); nothing unclaimed is registered.
2. **Claims follow the batch's fate.** They belong to a place, not to a process: a writer killed
   mid-batch leaves claims its redelivery finds as ``m``; a split child finds its parent's claims
   on its own events as ``m``. A batch dead-lettered whole releases the claims of the events it
   dead-letters (compare-and-delete on the exact place), so a replay of them lands; an event the
   table rejects (a strict schema) releases its claim with its dead letter. Events of a table
   already holding the batch keep theirs.
3. **Count once.** Duplicates are counted in the same script that registers the batch's files for
   the table (a batch whose events there were all repeats registers an empty part, remembered as
   committed at once), which admits a batch once per table: a redelivery does not count again.

So every event either lands once, or is in the dead letters with the reason, or was counted as a
byte-identical repeat of one that did (or of one in the dead letters, whose replay lands it).

**Memory and expiry.** Claims live in hashes ``icefleet:claims:<table>@<bucket>``, one per time
bucket of a quarter of the window (:data:`BUCKETS`), by the Redis server's clock (writers' clocks
may differ): a claim goes to the current bucket, which expires one window after it ends; a lookup
reads the current bucket and the :data:`BUCKETS` before it. An identity is remembered at least the
window and at most a quarter longer; memory is bounded by the ids of 1.25 windows. The width
follows the window, so changing the window starts the memory of identities afresh. An entry is a
16-byte identity and a 20-byte value (owner 8, position 4, bytes digest 8): ~90 bytes of Redis
memory an id, measured by ``python -m benchmarks dedupe``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson
import redis

from common.coord import keys
from common.wire import (
    CLAIM_VALUE_BYTES,
    IDENTITY_BYTES,
    claim_keys,
    event_identity,
    lineage,
    owner_digest,
    raw_digest,
)

#: The window is cut into this many time buckets: expiry granularity a quarter of the window, at
#: the cost of reading five hashes per claim.
BUCKETS = 4
_CHUNK = 2_000  # fields per HMGET/HSET: Lua's unpack() has a stack limit of ~8,000 values

# Shared by both scripts: the live buckets, newest first (ARGV[1] prefix, [2] width s, [3] back).
_BUCKETS_LUA = """
local now = tonumber(redis.call('TIME')[1])
local width = tonumber(ARGV[2])
local current = math.floor(now / width)
local live = {}
for b = current, current - tonumber(ARGV[3]), -1 do
  local key = ARGV[1] .. b
  if redis.call('exists', key) == 1 then
    live[#live + 1] = key
  end
end
local ids, values = ARGV[5], ARGV[6]
local n = #ids / ID
local function id(i) return string.sub(ids, (i - 1) * ID + 1, i * ID) end
local function value(i) return string.sub(values, (i - 1) * VALUE + 1, i * VALUE) end
"""

# ARGV: prefix, width s, buckets back, window s, identities (16 bytes each, unique), values (20
# bytes each) → one code per identity: n new, m mine, d duplicate, c conflicting. Each identity
# becomes a Lua string once (the script's main cost is per identity: about a microsecond of the
# server's time); a batch of new identities, the common case, skips the per-identity judging.
_CLAIM_LUA = (
    _BUCKETS_LUA
    + """
local sub = string.sub
local idt = {}
for i = 1, n do idt[i] = sub(ids, (i - 1) * ID + 1, i * ID) end
local found = {}
local seen = false
for _, key in ipairs(live) do
  for s = 1, n, CHUNK do
    local e = math.min(s + CHUNK - 1, n)
    local held = redis.call('hmget', key, unpack(idt, s, e))
    for j = 1, e - s + 1 do
      local i = s + j - 1
      if held[j] and not found[i] then
        found[i] = held[j]
        seen = true
      end
    end
  end
end
local new = {}
local codes
if not seen then
  for i = 1, n do
    new[2 * i - 1] = idt[i]
    new[2 * i] = sub(values, (i - 1) * VALUE + 1, i * VALUE)
  end
  codes = string.rep('n', n)
else
  local c = {}
  for i = 1, n do
    local held = found[i]
    local mine = sub(values, (i - 1) * VALUE + 1, i * VALUE)
    if not held then
      c[i] = 'n'
      new[#new + 1] = idt[i]
      new[#new + 1] = mine
    elseif held == mine then
      c[i] = 'm'
    elseif sub(held, 13) == sub(mine, 13) then
      c[i] = 'd'
    else
      c[i] = 'c'
    end
  end
  codes = table.concat(c)
end
if #new > 0 then
  local key = ARGV[1] .. current
  for s = 1, #new, 2 * CHUNK do
    redis.call('hset', key, unpack(new, s, math.min(s + 2 * CHUNK - 1, #new)))
  end
  redis.call('expireat', key, (current + 1) * width + tonumber(ARGV[4]))
end
return codes
"""
)

# ARGV: prefix, width s, buckets back, (unused), identities, values → claims released
_RELEASE_LUA = (
    _BUCKETS_LUA
    + """
local released = 0
for i = 1, n do
  local mine = value(i)
  for _, key in ipairs(live) do
    if redis.call('hget', key, id(i)) == mine then
      released = released + redis.call('hdel', key, id(i))
      break
    end
  end
end
return released
"""
)


# ARGV: prefix, width s, buckets back, window s, identities (16 bytes each), bytes digests (8
# bytes each, the last 8 of a claim value; none: any bytes) → claims dropped: those of these
# identities holding these bytes, whatever place
_FORGET_LUA = (
    _BUCKETS_LUA
    + """
local forgotten = 0
local any = #values == 0
for i = 1, n do
  local digest = string.sub(values, (i - 1) * 8 + 1, i * 8)
  for _, key in ipairs(live) do
    local held = redis.call('hget', key, id(i))
    if held and (any or string.sub(held, VALUE - 7) == digest) then
      forgotten = forgotten + redis.call('hdel', key, id(i))
    end
  end
end
return forgotten
"""
)


def _script(text: str) -> str:
    return (
        text.replace("CHUNK", str(_CHUNK))
        .replace("ID", str(IDENTITY_BYTES))
        .replace("VALUE", str(CLAIM_VALUE_BYTES))
    )


NEW, MINE, DUPLICATE, CONFLICT = "n", "m", "d", "c"
WRITE = frozenset((NEW, MINE))
#: (index, source, id, raw) of an event: what claiming it needs
EventRow = tuple[int, str, str, str]
#: a batch's events to claim, by table
Rows = Mapping[str, Sequence[EventRow]]


class EventClaims:
    """Claims on event identities, per table (see the module docstring)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._claim = client.register_script(_script(_CLAIM_LUA))
        self._release = client.register_script(_script(_RELEASE_LUA))
        self._forget = client.register_script(_script(_FORGET_LUA))

    @staticmethod
    def _args(table: str, window_s: int, ids: bytes, values: bytes) -> list[str | int | bytes]:
        width = max(1, -(-int(window_s) // BUCKETS))  # ceil: BUCKETS buckets cover the window
        return [keys.claims_prefix(table), width, BUCKETS, int(window_s), ids, values]

    def claim(self, table: str, ids: bytes, values: bytes, window_s: int) -> str:
        """Claim identities (16 bytes each, unique) for values (20 bytes each) in ``table``;
        one code per identity."""
        if not ids:
            return ""
        codes = self._claim(args=self._args(table, window_s, ids, values))
        return codes.decode() if isinstance(codes, bytes) else str(codes)

    def release(self, table: str, ids: bytes, values: bytes, window_s: int) -> int:
        """Drop the claims that still hold exactly these values (same place); return how many."""
        if not ids:
            return 0
        return int(self._release(args=self._args(table, window_s, ids, values)))

    def forget(self, table: str, ids: bytes, digests: bytes, window_s: int) -> int:
        """Drop the claims of identities whose bytes are these digests (``b""``: whatever their
        bytes), whoever placed them: the rows are no longer in the table (a quarantined file),
        so they may land again."""
        if not ids:
            return 0
        return int(self._forget(args=self._args(table, window_s, ids, digests)))


@dataclass
class Verdicts:
    """What claiming a batch's events decided, per event index (valid events, payload order)."""

    skip: set[int] = field(default_factory=set)  # repeats: not written
    repeats: list[tuple[int, str, str]] = field(default_factory=list)  # (index, table, d|c)

    def counts(self, before: int) -> dict[str, tuple[int, int]]:
        """Per table (duplicates, conflicting) among the events before index ``before``."""
        out: dict[str, tuple[int, int]] = {}
        for index, table, code in self.repeats:
            if index < before:
                dropped, conflicting = out.get(table, (0, 0))
                out[table] = (
                    (dropped + 1, conflicting) if code == DUPLICATE else (dropped, conflicting + 1)
                )
        return out


def place(batch_id: str) -> tuple[bytes, int]:
    """The owner digest and offset of a batch's events (its lineage root, its start in it)."""
    root, offset = lineage(batch_id)
    return owner_digest(root), offset


def claim_batch(claims: EventClaims, batch_id: str, rows: Rows, window_s: int) -> Verdicts:
    """Claim the events of a batch (rows of the tables with dedupe on); see the module docstring.

    Only the first occurrence of an identity in the batch is claimed; a later one is a
    duplicate of it (same bytes) or a conflict (other bytes).
    """
    owner, offset = place(batch_id)
    verdicts = Verdicts()
    for table, events in rows.items():
        identities, values = claim_keys(owner, offset, events)
        indexes = [event[0] for event in events]
        claim_keyed(claims, table, indexes, identities, b"".join(values), window_s, verdicts)
    return verdicts


def claim_keyed(
    claims: EventClaims,
    table: str,
    indexes: Sequence[int],
    identities: list[bytes],
    values: bytes,
    window_s: int,
    verdicts: Verdicts,
) -> None:
    """Claim events of one table whose keys are made (:func:`common.wire.claim_keys`; the
    ``values`` joined), adding the repeats to ``verdicts``."""
    if len(set(identities)) != len(identities):  # repeats inside the batch: the slow way
        indexes, identities, values = _first_occurrences(
            table, indexes, identities, values, verdicts
        )
    codes = claims.claim(table, b"".join(identities), values, window_s)
    if codes.count(NEW) + codes.count(MINE) == len(codes):
        return  # the common case: nothing seen before
    for index, code in zip(indexes, codes, strict=True):
        if code not in WRITE:
            verdicts.skip.add(index)
            verdicts.repeats.append((index, table, code))


def _first_occurrences(
    table: str,
    indexes: Sequence[int],
    identities: list[bytes],
    values: bytes,
    verdicts: Verdicts,
) -> tuple[list[int], list[bytes], bytes]:
    """Keep the first occurrence of each identity; judge the others against it."""
    size = CLAIM_VALUE_BYTES
    seen: dict[bytes, bytes] = {}
    kept: list[int] = []
    for n, (index, identity) in enumerate(zip(indexes, identities, strict=True)):
        value = values[n * size : (n + 1) * size]
        earlier = seen.get(identity)
        if earlier is None:
            seen[identity] = value
            kept.append(index)
        else:
            code = DUPLICATE if earlier[12:] == value[12:] else CONFLICT
            verdicts.repeats.append((index, table, code))
            verdicts.skip.add(index)
    return kept, list(seen), b"".join(seen.values())


def release_events(claims: EventClaims, batch_id: str, rows: Rows, window_s: int) -> int:
    """Release the claims a batch holds on these events (a claim held for another place, or
    already gone, is left alone)."""
    owner, offset = place(batch_id)
    released = 0
    for table, events in rows.items():
        identities, values = claim_keys(owner, offset, events)
        pairs = dict(zip(identities, values, strict=True))
        released += claims.release(table, b"".join(pairs), b"".join(pairs.values()), window_s)
    return released


def forget_raw_events(claims: EventClaims, table: str, raws: Sequence[str], window_s: int) -> int:
    """Forget the claims on the events ``raws`` (as received: ``raw_event``) in ``table``, so a
    copy of them sent again lands; events that are not JSON objects with a source and id are
    skipped (they never held a claim)."""
    ids: list[bytes] = []
    digests: list[bytes] = []
    for raw in raws:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        source, event_id = event.get("source"), event.get("id")
        if isinstance(source, str) and isinstance(event_id, str):
            ids.append(event_identity(source, event_id))
            digests.append(raw_digest(raw))
    return claims.forget(table, b"".join(ids), b"".join(digests), window_s)


def forget_identities(
    claims: EventClaims, table: str, identities: Sequence[tuple[str, str]], window_s: int
) -> int:
    """Forget the claims on these (source, id) in ``table``, whatever bytes they held: rows that
    left the table whose ``raw_event`` cannot be read (a quarantined file), so their producer can
    send them again."""
    ids = b"".join(event_identity(source, event_id) for source, event_id in identities)
    return claims.forget(table, ids, b"", window_s)


__all__ = [
    "BUCKETS",
    "CONFLICT",
    "DUPLICATE",
    "MINE",
    "NEW",
    "EventClaims",
    "EventRow",
    "Rows",
    "Verdicts",
    "claim_batch",
    "claim_keyed",
    "forget_identities",
    "forget_raw_events",
    "place",
    "release_events",
]
