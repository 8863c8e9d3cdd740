"""The producer client: events in, write tasks on the ``ingest`` queue, and a way to wait for them.

:meth:`Producer.enqueue` cuts the events into batches of at most ``batch_max_events`` events and
``batch_max_bytes`` bytes of NDJSON, records each batch as *outstanding* in Redis and sends one
``icefleet.write_batch`` task per batch, by name, in Celery's message protocol 2, through kombu:
a producer needs neither Celery nor the workers' code, and ``common`` stays free of Celery.

What :meth:`Producer.wait` waits for (:class:`Backlog`): a batch is *outstanding* from enqueue until
a writer has registered its files as pending (or dead-lettered it), then *pending* until the
committer's snapshot holds it; the pending registry keeps a *prepared* record while a commit is
being made. Everything enqueued so far is committed when, read in one Redis transaction, no batch
is outstanding, no table has pending batches and the ingest queue is empty, and no prepared record
is left. The writer registers a batch before it drops it from *outstanding*, so a batch is always
visible in one of the two. A batch whose message is lost (a Redis restart without AOF) stays
outstanding, and ``wait`` reports it instead of pretending it landed.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from common import keys
from common.events import encode_ndjson, split_events
from common.routing import TableName
from common.settings import Settings, load_settings

WRITE_TASK = "icefleet.write_batch"
INGEST_QUEUE = "ingest"
COMMIT_QUEUE = "commit"
MAX_BATCH_ID_CHARS = 200
# kombu's Redis transport keeps messages of priority p > 0 in "<queue>\x06\x16<p>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_UNACKED = "unacked"  # kombu's hash of delivered, unacknowledged messages

EventLike = Mapping[str, Any] | str | bytes


class Publisher(Protocol):
    """Sends one task message; returns the task id."""

    def __call__(self, task: str, kwargs: dict[str, Any], queue: str) -> str: ...


def task_message(task: str, task_id: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Body and headers of a Celery protocol 2 message (no chain, no callbacks, no ETA)."""
    shown = {k: v for k, v in kwargs.items() if k != "payload"}
    if "payload" in kwargs:
        shown["payload"] = f"<{len(kwargs['payload'])} chars>"
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": repr(shown),
        "origin": f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    body = ((), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    return body, headers


class KombuPublisher:
    """Publishes task messages straight into a queue of the broker (kombu's default exchange).

    The default (anonymous) exchange delivers to the queue named by the routing key, so nothing
    has to be declared and a message sent before any worker started is kept. Not thread-safe.
    """

    def __init__(self, broker_url: str) -> None:
        from kombu import Connection

        self._connection = Connection(broker_url)
        self._producer: Any = None

    def __call__(self, task: str, kwargs: dict[str, Any], queue: str) -> str:
        task_id = str(uuid.uuid4())
        body, headers = task_message(task, task_id, kwargs)
        if self._producer is None:
            self._producer = self._connection.Producer(serializer="json")
        self._producer.publish(
            body,
            exchange="",
            routing_key=queue,
            headers=headers,
            correlation_id=task_id,
            reply_to="",
            delivery_mode=2,
            retry=True,
            retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5},
        )
        return task_id

    def close(self) -> None:
        self._connection.release()


# --- the backlog --------------------------------------------------------------------------------


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Backlog:
    """What is not committed yet, as one consistent reading of Redis."""

    outstanding: int = 0
    oldest_outstanding_ms: int | None = None
    pending: dict[str, int] = field(default_factory=dict)  # table → pending batches
    prepared: tuple[str, ...] = ()  # tables with a prepared commit record
    queued: dict[str, int] = field(default_factory=dict)  # queue → messages waiting
    unacked: int = 0  # messages delivered to a worker, not acknowledged (running or scheduled)

    @property
    def done(self) -> bool:
        """Everything enqueued so far is committed (or dead-lettered)."""
        return (
            self.outstanding == 0
            and not self.pending
            and not self.prepared
            and self.queued.get(INGEST_QUEUE, 0) == 0
        )

    def describe(self, now_ms: int | None = None) -> str:
        """One line for a human: what is still in the way."""
        if self.done:
            return "nothing pending: everything enqueued is committed"
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        parts = []
        if self.outstanding:
            age = (now_ms - (self.oldest_outstanding_ms or now_ms)) / 1000
            parts.append(f"{self.outstanding} batch(es) not written yet (oldest {age:.1f}s)")
        if self.queued.get(INGEST_QUEUE):
            parts.append(f"{self.queued[INGEST_QUEUE]} message(s) in the ingest queue")
        for table, count in sorted(self.pending.items()):
            parts.append(f"{table}: {count} batch(es) written, not committed")
        for table in self.prepared:
            parts.append(f"{table}: a prepared commit not finished")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "outstanding": self.outstanding,
            "oldest_outstanding_ms": self.oldest_outstanding_ms,
            "pending": dict(self.pending),
            "prepared": list(self.prepared),
            "queued": dict(self.queued),
            "unacked": self.unacked,
        }


def queue_length(pipe: Any, queue: str) -> None:
    """Queue the LLENs of a kombu Redis queue and its priority lists on ``pipe``."""
    for suffix in _PRIORITY_SUFFIXES:
        pipe.llen(queue + suffix)


def read_backlog(client: redis.Redis) -> Backlog:
    """Read the backlog: the counts that decide ``done`` come from one MULTI/EXEC."""
    queues = (INGEST_QUEUE, COMMIT_QUEUE)
    pipe = client.pipeline(transaction=True)
    pipe.zcard(keys.outstanding())
    pipe.zrange(keys.outstanding(), 0, 0, withscores=True)
    pipe.smembers(keys.pending_tables())
    for queue in queues:
        queue_length(pipe, queue)
    pipe.hlen(_UNACKED)
    replies = pipe.execute()
    outstanding, oldest, tables = int(replies[0]), replies[1], replies[2]
    lengths = replies[3 : 3 + len(queues) * len(_PRIORITY_SUFFIXES)]
    n = len(_PRIORITY_SUFFIXES)
    queued = {
        queue: sum(int(x) for x in lengths[i * n : (i + 1) * n]) for i, queue in enumerate(queues)
    }
    names = sorted(_text(t) for t in tables)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hlen(keys.pending(name))
    pending = {name: int(count) for name, count in zip(names, pipe.execute(), strict=True)}
    pattern = keys.prepared("*")
    prepared = tuple(
        sorted(_text(k)[len(pattern) - 1 :] for k in client.scan_iter(match=pattern, count=1000))
    )
    return Backlog(
        outstanding=outstanding,
        oldest_outstanding_ms=int(oldest[0][1]) if oldest else None,
        pending={t: c for t, c in pending.items() if c},
        prepared=prepared,
        queued=queued,
        unacked=int(replies[-1]),
    )


# --- batches ------------------------------------------------------------------------------------


def split_lines(lines: list[str], max_events: int, max_bytes: int) -> list[list[str]]:
    """Cut NDJSON lines into runs of at most ``max_events`` lines and ``max_bytes`` bytes.

    A line longer than ``max_bytes`` travels alone (the writer dead-letters it if it is larger
    than ``max_event_bytes``): splitting never drops or reorders an event.
    """
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for line in lines:
        line_bytes = len(line.encode("utf-8", "surrogatepass")) + 1
        if current and (len(current) >= max_events or size + line_bytes > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(line)
        size += line_bytes
    if current:
        batches.append(current)
    return batches


def child_ids(batch_id: str, count: int) -> list[str]:
    """The ids of a batch's parts: the id itself when it is not split, else ``<id>:<n>``."""
    return [batch_id] if count == 1 else [f"{batch_id}:{n}" for n in range(count)]


def _as_lines(events: Iterable[EventLike] | str | bytes) -> list[str]:
    if isinstance(events, str | bytes):  # one payload: NDJSON, a JSON array or one event
        events = split_events(events)
    text = encode_ndjson(events)
    return text.split("\n")[:-1]


class Producer:
    """Enqueues CloudEvents for the writers: ``Producer(settings).enqueue(events)``.

    ``target`` is a :class:`Settings` or a Redis URL (the other settings then come from the
    environment). ``client`` and ``publish`` replace the Redis client and the message sender
    (tests). One producer per thread; :meth:`close` it, or use it as a context manager.
    """

    def __init__(
        self,
        target: Settings | str | None = None,
        *,
        client: redis.Redis | None = None,
        publish: Publisher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(target, str):
            target = load_settings(redis_url=target)
        self.settings = target if target is not None else load_settings()
        self.client = client or redis.Redis.from_url(self.settings.redis_url)
        self._owns_client = client is None
        self._publish: Publisher = publish or KombuPublisher(self.settings.redis_url)
        self._clock = clock
        self.last_batch_ids: list[str] = []

    def enqueue(
        self,
        events: Iterable[EventLike] | str | bytes,
        table: str | None = None,
        batch_id: str | None = None,
    ) -> str:
        """Send events to be written; return the batch id.

        ``events`` are mappings, or JSON text per event (kept verbatim), or one payload
        (``str``/``bytes``: NDJSON, a JSON array, a CloudEvents batch). ``table``
        (``namespace.table``) sends every event there instead of routing by type. ``batch_id`` is
        the idempotency key: enqueueing the same events under the same id again lands them once.
        When the events exceed one batch they go as ``<id>:0``, ``<id>:1``, ... (see
        :attr:`last_batch_ids`); resend with the same batch limits to keep those ids.
        """
        return self._enqueue(events, table, batch_id)[0]

    def enqueue_many(
        self,
        events: Iterable[EventLike] | str | bytes,
        table: str | None = None,
        batch_id: str | None = None,
    ) -> list[str]:
        """Like :meth:`enqueue`, returning the ids of the batches actually sent."""
        return self._enqueue(events, table, batch_id)[1]

    def _enqueue(
        self, events: Iterable[EventLike] | str | bytes, table: str | None, batch_id: str | None
    ) -> tuple[str, list[str]]:
        if table is not None:
            TableName.parse(table)  # InvalidIdentifierError says what is wrong with it
        if batch_id is not None and not (0 < len(batch_id) <= MAX_BATCH_ID_CHARS):
            raise ValueError(f"batch_id must be 1 to {MAX_BATCH_ID_CHARS} characters")
        lines = _as_lines(events)
        if not lines:
            raise ValueError("nothing to enqueue: no events")
        parent = batch_id or str(uuid.uuid4())
        batches = split_lines(lines, self.settings.batch_max_events, self.settings.batch_max_bytes)
        ids = child_ids(parent, len(batches))
        self.last_batch_ids = ids
        for child, batch in zip(ids, batches, strict=True):
            self._send(child, "".join(f"{line}\n" for line in batch), table)
        return parent, ids

    def _send(self, batch_id: str, payload: str, table: str | None) -> None:
        now_ms = int(self._clock() * 1000)
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(keys.outstanding(), {batch_id: now_ms}, nx=True)
        pipe.zscore(keys.outstanding(), batch_id)
        added, score = pipe.execute()
        # A batch resent while still outstanding reuses its first enqueue time: both deliveries
        # then write byte-identical files (``_ingested_at`` is the enqueue time).
        enqueued_at_ms = int(score) if score is not None else now_ms
        kwargs = {
            "batch_id": batch_id,
            "payload": payload,
            "table": table,
            "enqueued_at_ms": enqueued_at_ms,
        }
        try:
            self._publish(WRITE_TASK, kwargs, INGEST_QUEUE)
        except BaseException:
            if added:
                self.client.zrem(keys.outstanding(), batch_id)
            raise

    def backlog(self) -> Backlog:
        return read_backlog(self.client)

    def wait(
        self,
        timeout_s: float | None = None,
        poll_s: float = 0.2,
        on_poll: Callable[[Backlog], None] | None = None,
    ) -> Backlog:
        """Block until everything enqueued so far (by anyone) is committed, or the timeout.

        Returns the last :class:`Backlog` read: check :attr:`Backlog.done`.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            backlog = read_backlog(self.client)
            if on_poll is not None:
                on_poll(backlog)
            if backlog.done or (deadline is not None and time.monotonic() >= deadline):
                return backlog
            time.sleep(poll_s)

    def close(self) -> None:
        close = getattr(self._publish, "close", None)
        if close is not None:
            close()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the writer's side of the bookkeeping --------------------------------------------------------


class Outstanding:
    """The writer's view of ``icefleet:outstanding`` and the delivery counts of batches."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def started(self, batch_id: str) -> int:
        """Count one more delivery of the batch's write task; return the count (1 = first)."""
        return int(self._client.hincrby(keys.deliveries(), batch_id, 1))

    def done(self, batch_id: str) -> None:
        """The batch is registered as pending (or dead-lettered): it no longer holds up ``wait``."""
        pipe = self._client.pipeline(transaction=True)
        pipe.zrem(keys.outstanding(), batch_id)
        pipe.hdel(keys.deliveries(), batch_id)
        pipe.execute()
