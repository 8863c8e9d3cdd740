"""The fleet-wide budget of work not yet written: backpressure for every producer.

Work not yet written is what is *outstanding* (:mod:`common.coord.backlog`): each such batch holds
its message in the ingest queue and the producer's copy (:mod:`common.coord.resend`) in Redis.
Past the budget a producer is refused with :class:`~common.errors.OverloadedError`, which the
gateway answers as ``429`` with ``Retry-After``, instead of Redis growing until the kernel kills it.

**Accounting, O(1) per batch.** The batch count is ``ZCARD`` of the outstanding set itself. The
bytes (of the packed payload, what Redis holds twice: message and copy) are a counter
(``icefleet:budget:bytes``) next to a hash of each outstanding batch's size
(``icefleet:budget:sizes``). Both change only inside the same Lua script as the outstanding set:
:data:`_ADMIT` (check, add, charge) and :data:`_RELEASE` (remove, refund, drop the copy), so no
crash of a producer or a writer can leave them apart: a killed writer's batch stays outstanding,
and charged, until it is written by the redelivery. Anything that removes a batch from
*outstanding* some other way (an old producer, a hand edit) leaves its size behind; the sweep's
:func:`reconcile` (every few seconds on the committer) drops those and recomputes the counter, so
nothing can hold budget for ever.

**Admission.** A producer asks once per request, for all its parts (:func:`admit` with
``request_bytes``/``request_batches``): a request is refused whole or taken whole, never half.
A fleet with nothing outstanding admits any request, even one larger than the budget (it could
never pass otherwise). Batches handed back by writers and sent again by the sweep replace work
already counted and are never refused (``check=False``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import redis

from common.coord import keys
from common.errors import OverloadedError

__all__ = [
    "Budget",
    "BudgetUse",
    "admit",
    "physical_memory_bytes",
    "read_use",
    "reconcile",
    "release",
    "retry_after_s",
]

MIN_AUTO_BYTES = 64 * 1024 * 1024
AUTO_MEMORY_FRACTION = 16  # the automatic byte budget is 1/16 of the machine's memory
AUTO_BYTES_PER_BATCH = 64 * 1024  # the automatic batch budget: one batch per 64 KiB of it
MIN_AUTO_BATCHES = 1_000
RETRY_AFTER_MAX_S = 30


def physical_memory_bytes() -> int:
    """The machine's memory (0 where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class Budget:
    """Limits on the work not yet written, fleet-wide: bytes of packed payload and batches."""

    max_bytes: int
    max_batches: int

    @classmethod
    def sized(
        cls, max_bytes: int = 0, max_batches: int = 0, memory_bytes: int | None = None
    ) -> Budget:
        """The budget for settings where ``0`` means "from the machine's memory"."""
        if not max_bytes:
            memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
            max_bytes = max(MIN_AUTO_BYTES, memory // AUTO_MEMORY_FRACTION)
        if not max_batches:
            max_batches = max(MIN_AUTO_BATCHES, max_bytes // AUTO_BYTES_PER_BATCH)
        return cls(max_bytes, max_batches)


@dataclass(frozen=True)
class BudgetUse:
    """How much of the budget is in use, as one reading."""

    bytes: int
    batches: int
    oldest_ms: int | None = None


def retry_after_s(oldest_ms: int | None, now_ms: int) -> int:
    """The delay suggested to a refused producer: a quarter of the age of the oldest batch not
    written (writers that fell far behind, or are stopped, need long), 1 to 30 seconds."""
    if oldest_ms is None:
        return 1
    return max(1, min(RETRY_AFTER_MAX_S, math.ceil((now_ms - oldest_ms) / 4000)))


# KEYS: outstanding, sizes, bytes, payload copy. ARGV: batch id, enqueue ms, size, check (0/1),
# max bytes, max batches, request bytes, request batches, the copy (JSON, "" for none), its TTL.
# Returns {1, score} when added, {0, score} when already outstanding (not charged again),
# {-1, batches, bytes, oldest score} when refused.
_ADMIT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score then return {0, score} end
if ARGV[4] == '1' then
  local batches = redis.call('ZCARD', KEYS[1])
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if batches > 0 and (batches + tonumber(ARGV[8]) > tonumber(ARGV[6])
      or used + tonumber(ARGV[7]) > tonumber(ARGV[5])) then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {-1, batches, used, oldest[2] or false}
  end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('INCRBY', KEYS[3], ARGV[3])
if ARGV[9] ~= '' then redis.call('SET', KEYS[4], ARGV[9], 'EX', ARGV[10]) end
return {1, ARGV[2]}
"""

# KEYS: outstanding, sizes, bytes, deliveries, payload copy. ARGV: batch id.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local size = redis.call('HGET', KEYS[2], ARGV[1])
if size then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('DECRBY', KEYS[3], size)
end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[5])
return size
"""

# KEYS: outstanding, sizes, bytes. Drops sizes of batches no longer outstanding, recomputes the
# counter; returns {sizes dropped, bytes in use}.
_RECONCILE = """
local sizes = redis.call('HGETALL', KEYS[2])
local total, dropped = 0, 0
for i = 1, #sizes, 2 do
  if redis.call('ZSCORE', KEYS[1], sizes[i]) then
    total = total + tonumber(sizes[i + 1])
  else
    redis.call('HDEL', KEYS[2], sizes[i])
    dropped = dropped + 1
  end
end
redis.call('SET', KEYS[3], total)
return {dropped, total}
"""


def _script(client: Any, source: str) -> Any:
    # register_script runs EVALSHA and falls back to EVAL once (the script cache is per server)
    return client.register_script(source)


def admit(
    client: redis.Redis,
    batch_id: str,
    *,
    enqueued_ms: int,
    size: int,
    budget: Budget | None,
    request_bytes: int | None = None,
    request_batches: int = 1,
    copy: bytes = b"",
    copy_ttl_s: int = 1,
) -> tuple[bool, int]:
    """Make the batch outstanding and charge it (one Lua call); return (added, first enqueue ms).

    ``copy`` (the write task's arguments, :mod:`common.coord.resend`) is stored with it when the
    batch is added, in the same step: an outstanding batch always has the copy it may be sent
    again from, whatever kills the producer or Redis in between.

    ``budget`` ``None``: never refused (writers' hand-backs). Otherwise past the budget raises
    :class:`OverloadedError` with the suggested delay, leaving Redis unchanged.
    """
    check = budget is not None
    limits = budget or Budget(0, 0)
    reply = _script(client, _ADMIT)(
        keys=[
            keys.outstanding(),
            keys.budget_sizes(),
            keys.budget_bytes(),
            keys.payload(batch_id),
        ],
        args=[
            batch_id,
            enqueued_ms,
            size,
            "1" if check else "0",
            limits.max_bytes,
            limits.max_batches,
            size if request_bytes is None else request_bytes,
            request_batches,
            copy,
            copy_ttl_s,
        ],
    )
    status = int(reply[0])
    if status < 0:
        oldest = int(float(reply[3])) if reply[3] else None
        raise OverloadedError(
            retry_after_s(oldest, enqueued_ms),
            in_use_bytes=int(reply[2]),
            in_use_batches=int(reply[1]),
            max_bytes=limits.max_bytes,
            max_batches=limits.max_batches,
        )
    return status == 1, int(float(reply[1]))


def release(client: redis.Redis, batch_id: str) -> None:
    """The batch is written or dead-lettered: not outstanding, its budget and copy freed."""
    _script(client, _RELEASE)(
        keys=[
            keys.outstanding(),
            keys.budget_sizes(),
            keys.budget_bytes(),
            keys.deliveries(),
            keys.payload(batch_id),
        ],
        args=[batch_id],
    )


def reconcile(client: redis.Redis) -> int:
    """Free the budget of batches that left *outstanding* without :func:`release`; return how
    many there were. O(outstanding batches): run by the periodic sweep, not per batch."""
    reply = _script(client, _RECONCILE)(
        keys=[keys.outstanding(), keys.budget_sizes(), keys.budget_bytes()], args=[]
    )
    return int(reply[0])


def read_use(client: redis.Redis) -> BudgetUse:
    """The budget in use now (one MULTI/EXEC)."""
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.budget_bytes())
    pipe.zcard(keys.outstanding())
    pipe.zrange(keys.outstanding(), 0, 0, withscores=True)
    used, batches, oldest = pipe.execute()
    return BudgetUse(
        bytes=int(used or 0),
        batches=int(batches),
        oldest_ms=int(oldest[0][1]) if oldest else None,
    )
