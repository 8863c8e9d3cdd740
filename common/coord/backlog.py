"""What is not committed yet, and waiting until what was enqueued so far is.

A batch moves through three Redis structures:

1. **outstanding** (``icefleet:outstanding``, sorted set: batch id → first enqueue time), from the
   producer's enqueue (written *before* the message is sent) until a writer has registered its
   files as pending or dead-lettered it;
2. **pending** (``icefleet:pending:<table>``, per table), from registration (done *before* the
   batch leaves *outstanding*) until the committer's snapshot holds it: the pending entry and the
   commit's *prepared* record are dropped in one atomic step after the catalog commit;
3. then committed (or dead-lettered).

So at every instant a batch that is not committed is visible in *outstanding* or in a *pending*
hash, and one MULTI/EXEC reading both sees every such batch. :class:`Waiter` takes that reading
when a wait begins and waits for exactly those batches: "everything enqueued so far is
committed" while producers keep sending. A batch whose message was lost (Redis restarted without
its AOF) stays outstanding; the wait then times out naming it instead of pretending it landed.

**Split batches.** A writer that cannot write a batch in time splits it (common/write/partial.py):
it records the split point (``icefleet:split:<id>``), registers the part it wrote under the
batch's id, enqueues the rest as the child batch ``<id>~<offset>`` (outstanding first) and only
then drops the parent from *outstanding*. A batch waited for is done only when its split
descendants are: every poll reads the split records of the batches it follows in the same
MULTI/EXEC as their state, adds the children it finds (and reads again until no new one
appears), and counts a child as "not written yet" while its parent is still outstanding, since
the child may not be enqueued yet. Once the parent has left *outstanding*, its child is in
*outstanding* or a *pending* hash, or already committed or dead-lettered: nothing in between is
missed.

:func:`read_backlog` is the global picture ``icefleet status`` shows (queues, counts, prepared
records); its :attr:`Backlog.idle` means nothing at all is in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from common.coord import keys
from common.coord.replies import as_text
from common.wire import COMMIT_QUEUE, INGEST_QUEUE, split_child_id

# kombu's Redis transport keeps messages of priority p > 0 in "<queue>\x06\x16<p>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_UNACKED = "unacked"  # kombu's hash of delivered, unacknowledged messages
_CHUNK = 10_000  # batch ids per ZMSCORE/HMGET


# --- the global picture --------------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """Everything not committed yet, as one reading of Redis."""

    outstanding: int = 0
    oldest_outstanding_ms: int | None = None
    pending: dict[str, int] = field(default_factory=dict)  # table → pending batches
    prepared: tuple[str, ...] = ()  # tables with a prepared commit record
    queued: dict[str, int] = field(default_factory=dict)  # queue → messages waiting
    unacked: int = 0  # messages delivered to a worker, not acknowledged (running or scheduled)

    @property
    def idle(self) -> bool:
        """Nothing is outstanding, pending, prepared or waiting in the ingest queue."""
        return (
            self.outstanding == 0
            and not self.pending
            and not self.prepared
            and self.queued.get(INGEST_QUEUE, 0) == 0
        )

    def describe(self, now_ms: int | None = None) -> str:
        """One line for a human: what is still in the way."""
        if self.idle:
            return "nothing in flight: everything enqueued is committed"
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        parts = []
        if self.outstanding:
            age = (now_ms - (self.oldest_outstanding_ms or now_ms)) / 1000
            parts.append(f"{self.outstanding} batch(es) not written yet (oldest {age:.1f}s)")
        if self.queued.get(INGEST_QUEUE):
            parts.append(f"{self.queued[INGEST_QUEUE]} message(s) in the ingest queue")
        if self.pending:
            tables = sorted(self.pending)
            shown = ", ".join(tables[:3]) + (
                f" and {len(tables) - 3} more" if len(tables) > 3 else ""
            )
            total = sum(self.pending.values())
            parts.append(f"{total} batch(es) written, not committed, in {shown}")
        if self.prepared:
            parts.append(f"{len(self.prepared)} prepared commit(s) not finished")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "idle": self.idle,
            "outstanding": self.outstanding,
            "oldest_outstanding_ms": self.oldest_outstanding_ms,
            "pending": dict(self.pending),
            "prepared": list(self.prepared),
            "queued": dict(self.queued),
            "unacked": self.unacked,
        }


def queued(client: redis.Redis, queue: str) -> int:
    """How many messages wait in a Celery queue (kombu's lists of every priority)."""
    pipe = client.pipeline(transaction=False)
    for suffix in _PRIORITY_SUFFIXES:
        pipe.llen(queue + suffix)
    return sum(int(n) for n in pipe.execute())


def read_backlog(client: redis.Redis) -> Backlog:
    """Read the global backlog; outstanding, pending tables and queues in one MULTI/EXEC."""
    queues = (INGEST_QUEUE, COMMIT_QUEUE)
    n = len(_PRIORITY_SUFFIXES)
    pipe = client.pipeline(transaction=True)
    pipe.zcard(keys.outstanding())
    pipe.zrange(keys.outstanding(), 0, 0, withscores=True)
    pipe.smembers(keys.pending_tables())
    for queue in queues:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
    pipe.hlen(_UNACKED)
    replies = pipe.execute()
    outstanding, oldest, tables = int(replies[0]), replies[1], replies[2]
    lengths = [int(x) for x in replies[3 : 3 + len(queues) * n]]
    queued = {queue: sum(lengths[i * n : (i + 1) * n]) for i, queue in enumerate(queues)}
    names = sorted(as_text(t) for t in tables)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hlen(keys.pending(name))
    counts = [int(c) for c in pipe.execute()]
    pattern = keys.prepared("*")
    prepared = sorted(as_text(k)[len(pattern) - 1 :] for k in client.scan_iter(match=pattern))
    return Backlog(
        outstanding=outstanding,
        oldest_outstanding_ms=int(oldest[0][1]) if oldest else None,
        pending={name: count for name, count in zip(names, counts, strict=True) if count},
        prepared=tuple(prepared),
        queued=queued,
        unacked=int(replies[-1]),
    )


# --- waiting for what was enqueued so far ----------------------------------------------------------


@dataclass(frozen=True)
class WaitResult:
    """How far the batches a :class:`Waiter` waits for have come."""

    waited_for: int
    not_written: tuple[str, ...] = ()
    not_committed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table → batch ids
    children: int = 0  # split children (``<id>~<offset>``) followed besides ``waited_for``

    @property
    def done(self) -> bool:
        return not self.not_written and not self.not_committed

    @property
    def remaining(self) -> int:
        return len(set(self.not_written) | {b for ids in self.not_committed.values() for b in ids})

    def describe(self) -> str:
        split = f" (and {self.children} split child batch(es))" if self.children else ""
        if self.done:
            return f"all {self.waited_for} batch(es) enqueued before the wait{split} are committed"
        total = self.waited_for + self.children
        parts = [f"{self.remaining} of {total} batch(es) not committed"]
        if self.not_written:
            shown = ", ".join(self.not_written[:3]) + (", ..." if len(self.not_written) > 3 else "")
            parts.append(f"{len(self.not_written)} not written yet ({shown})")
        tables = sorted(self.not_committed)
        for table in tables[:3]:
            parts.append(f"{table}: {len(self.not_committed[table])} written, not committed")
        if len(tables) > 3:
            parts.append(f"{len(tables) - 3} more table(s) with batches not committed")
        return "; ".join(parts)


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class Waiter:
    """Waits for the batches that are outstanding or pending when it is created (or for
    ``batch_ids``), and for the split children of each (see the module docstring).

    A batch id given that is neither outstanding nor pending counts as done (committed,
    dead-lettered, or never enqueued): only Redis' present state is known.
    """

    def __init__(self, client: redis.Redis, batch_ids: Iterable[str] | None = None) -> None:
        self._client = client
        if batch_ids is None:
            outstanding, pending, _ = self._read(None)
            self._ids = sorted(set(outstanding) | {b for ids in pending.values() for b in ids})
        else:
            self._ids = sorted(set(batch_ids))
        self.waited_for = len(self._ids)
        self.children = 0  # split children found so far
        self._seen = set(self._ids)  # every id followed at some point

    def poll(self) -> WaitResult:
        """One consistent reading of the batches followed and their split children; batches
        seen done are not asked about again."""
        if not self._ids:
            return WaitResult(self.waited_for, children=self.children)
        ids = list(self._ids)
        while True:
            outstanding, pending, splits = self._read(ids)
            found = sorted({split_child_id(b, at) for b, at in splits.items()} - set(ids))
            if not found:
                break
            # read again with them: a child's state must come from the same reading as its
            # parent's, or a child enqueued and written in between would be missed
            ids.extend(found)
            fresh = [b for b in found if b not in self._seen]
            self._seen.update(fresh)
            self.children += len(fresh)
        in_flight = set(outstanding) | {b for batch in pending.values() for b in batch}
        # the rest of a batch split while still outstanding: its child may not be enqueued yet
        coming = {split_child_id(b, splits[b]) for b in outstanding if b in splits} - in_flight
        self._ids = sorted(in_flight | coming)
        return WaitResult(
            self.waited_for,
            tuple(sorted(set(outstanding) | coming)),
            {table: tuple(batch) for table, batch in pending.items()},
            children=self.children,
        )

    def _read(
        self, ids: list[str] | None
    ) -> tuple[list[str], dict[str, list[str]], dict[str, int]]:
        """Which of ``ids`` (None: all) are outstanding, which pending where, and where each of
        ``ids`` was split (none for None), read together."""
        tables = {as_text(t) for t in self._client.smembers(keys.pending_tables())}
        while True:
            order = sorted(tables)
            pipe = self._client.pipeline(transaction=True)
            pipe.smembers(keys.pending_tables())
            if ids is None:
                pipe.zrange(keys.outstanding(), 0, -1)
                for table in order:
                    pipe.hkeys(keys.pending(table))
            else:
                for chunk in _chunks(ids):
                    pipe.zmscore(keys.outstanding(), chunk)
                for table in order:
                    for chunk in _chunks(ids):
                        pipe.hmget(keys.pending(table), chunk)
                for chunk in _chunks(ids):
                    pipe.mget([keys.split(b) for b in chunk])
            replies = pipe.execute()
            now_tables = {as_text(t) for t in replies[0]}
            if now_tables <= tables:
                break
            tables |= now_tables  # a table got its first pending batch meanwhile: read again
        if ids is None:
            outstanding = [as_text(b) for b in replies[1]]
            pending = {t: [as_text(b) for b in r] for t, r in zip(order, replies[2:], strict=True)}
            return outstanding, {t: b for t, b in pending.items() if b}, {}
        n = len(list(_chunks(ids)))
        scores = [s for reply in replies[1 : 1 + n] for s in reply]
        outstanding = [b for b, score in zip(ids, scores, strict=True) if score is not None]
        rest = replies[1 + n : 1 + n + len(order) * n]
        pending = {}
        for i, table in enumerate(order):
            values = [v for reply in rest[i * n : (i + 1) * n] for v in reply]
            found = [b for b, v in zip(ids, values, strict=True) if v is not None]
            if found:
                pending[table] = found
        offsets = [v for reply in replies[1 + n + len(order) * n :] for v in reply]
        # a record of 0 is a batch written whole (common/write/partial.py: WHOLE): no child
        splits = {b: int(v) for b, v in zip(ids, offsets, strict=True) if v and int(v) > 0}
        return outstanding, pending, splits


# --- the writer's side of the bookkeeping ----------------------------------------------------------


class Outstanding:
    """The writer's view of ``icefleet:outstanding`` and the delivery counts of batches."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def started(self, batch_id: str) -> int:
        """Count one more delivery of the batch's write task; return the count (1 = first)."""
        return int(self._client.hincrby(keys.deliveries(), batch_id, 1))

    def done(self, batch_id: str) -> None:
        """The batch is registered as pending (or dead-lettered): it no longer holds up a wait,
        its share of the budget is freed and the copy of its task kept in case its message is
        lost (common/coord/resend.py) goes, in one step (common/coord/budget.py)."""
        from common.coord.budget import release  # budget imports nothing of this module

        release(self._client, batch_id)
