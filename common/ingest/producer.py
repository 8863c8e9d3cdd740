"""The producer client: events in, write tasks on the ``ingest`` queue, and a way to wait for them.

:meth:`Producer.enqueue` cuts the events into batches of at most ``batch_max_events`` events and
``batch_max_bytes`` bytes of NDJSON, records each batch as *outstanding* in Redis and then sends one
``icefleet.write_batch`` task per batch, by name, in Celery's message protocol 2, through kombu:
a producer needs neither Celery nor the workers' code, and ``common`` stays free of Celery.
:meth:`Producer.wait` blocks until every batch enqueued (by anyone) before it was called is
committed; :mod:`common.coord.backlog` says how that is decided.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import redis

from common.coord import keys
from common.coord.backlog import (
    COMMIT_QUEUE,
    INGEST_QUEUE,
    Backlog,
    Waiter,
    WaitResult,
    read_backlog,
)
from common.coord.resend import retain
from common.errors import InvalidBatchIdError
from common.ingest.events import encode_ndjson, split_events
from common.ingest.payloads import pack
from common.ingest.routing import TableName
from common.settings import Settings, load_settings

WRITE_TASK = "icefleet.write_batch"
MAX_BATCH_ID_CHARS = 200
# A writer continues a batch it split as ``<id>~<offset>`` (common/write/partial.py): a producer's id of
# that shape could be taken for, or collide with, the child of another batch.
_CHILD_SUFFIX = re.compile(r"~[0-9]+\Z")
__all__ = [
    "COMMIT_QUEUE",
    "INGEST_QUEUE",
    "WRITE_TASK",
    "Backlog",
    "KombuPublisher",
    "Producer",
    "WaitResult",
    "check_batch_id",
    "child_ids",
    "split_lines",
    "task_message",
]

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


def check_batch_id(batch_id: str) -> str:
    """Return ``batch_id`` if a producer may use it, else raise :class:`InvalidBatchIdError`.

    1 to :data:`MAX_BATCH_ID_CHARS` characters, not ending in ``~<digits>``: writers name the rest
    of a batch they split ``<id>~<offset>``, so ``orders~12`` could be the child of ``orders``
    (and be taken for a duplicate of it, or its events for that child's).
    """
    if not 0 < len(batch_id) <= MAX_BATCH_ID_CHARS:
        raise InvalidBatchIdError(batch_id, f"it must be 1 to {MAX_BATCH_ID_CHARS} characters")
    if _CHILD_SUFFIX.search(batch_id):
        raise InvalidBatchIdError(
            batch_id,
            "it ends in '~<digits>', the form of the child batch a writer makes when it splits "
            "a batch (<id>~<offset>), so it could collide with one; use another separator",
        )
    return batch_id


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
        if batch_id is not None:
            check_batch_id(batch_id)  # InvalidBatchIdError (a ValueError) says why not
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
        packed, encoding = pack(payload)  # an eighth of the message: common/ingest/payloads.py
        kwargs = {
            "batch_id": batch_id,
            "payload": packed,
            "table": table,
            "enqueued_at_ms": enqueued_at_ms,
            "encoding": encoding,
        }
        # A copy until the batch is written: a message lost on its way is sent again from it
        retain(self.client, batch_id, kwargs, self.settings.dedup_window_s)
        try:
            self._publish(WRITE_TASK, kwargs, INGEST_QUEUE)
        except BaseException:
            if added:
                self.client.zrem(keys.outstanding(), batch_id)
                self.client.delete(keys.payload(batch_id))
            raise

    def backlog(self) -> Backlog:
        """The global picture: queues, outstanding and pending batches, prepared commits."""
        return read_backlog(self.client)

    def wait(
        self,
        timeout_s: float | None = None,
        poll_s: float = 0.2,
        on_poll: Callable[[WaitResult], None] | None = None,
        batch_ids: Iterable[str] | None = None,
    ) -> WaitResult:
        """Block until every batch enqueued so far (by any producer), or each of ``batch_ids``,
        is committed or dead-lettered, the split children writers made of them
        (``<id>~<offset>``) included, or until the timeout; check :attr:`WaitResult.done`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiter = Waiter(self.client, batch_ids)
        while True:
            result = waiter.poll()
            if on_poll is not None:
                on_poll(result)
            if result.done or (deadline is not None and time.monotonic() >= deadline):
                return result
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
