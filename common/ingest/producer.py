"""The producer client: events in, write tasks on the ``ingest`` queue, and a way to wait for them.

:meth:`Producer.enqueue` cuts the events into batches of at most ``batch_max_events`` events and
``batch_max_bytes`` bytes of NDJSON, records each batch as *outstanding* in Redis and then sends one
``icefleet.write_batch`` task per batch, by name, in Celery's message protocol 2, through kombu:
a producer needs neither Celery nor the workers' code, and ``common`` stays free of Celery.
:meth:`Producer.wait` blocks until every batch enqueued (by anyone) before it was called is
committed; :mod:`common.coord.backlog` says how that is decided.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import orjson
import redis

from common.coord.backlog import Backlog, Waiter, WaitResult, read_backlog
from common.coord.bindings import BatchBindings
from common.coord.budget import Budget, admit, release
from common.coord.redis_memory import require_fsync
from common.coord.resend import retain
from common.errors import OverloadedError
from common.ingest.events import encode_ndjson, split_events
from common.ingest.payloads import pack
from common.ingest.routing import TableName
from common.settings import Settings, load_settings
from common.wire import (
    INGEST_QUEUE,
    WRITE_TASK,
    WriteTask,
    check_batch_id,
    check_derived_id,
    content_digest,
    part_ids,
    task_message,
)

__all__ = [
    "Backlog",
    "KombuPublisher",
    "Producer",
    "WaitResult",
    "enqueue_write_task",
    "split_lines",
]

EventLike = Mapping[str, Any] | str | bytes


class Publisher(Protocol):
    """Sends one task message; returns the task id."""

    def __call__(self, task: str, kwargs: dict[str, Any], queue: str) -> str: ...


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


def _as_lines(events: Iterable[EventLike] | str | bytes) -> list[str]:
    if isinstance(events, str | bytes):  # one payload: NDJSON, a JSON array or one event
        events = split_events(events)
    text = encode_ndjson(events)
    return text.split("\n")[:-1]


def enqueue_write_task(
    client: redis.Redis,
    publish: Callable[[dict[str, Any]], Any],
    task: WriteTask,
    *,
    ttl_s: int,
    now_ms: int | None = None,
    budget: Budget | None = None,
    request: tuple[int, int] | None = None,
) -> WriteTask:
    """Send one write task the one way that loses nothing; return it as sent.

    The batch is *outstanding* before its message exists (so a wait sees it), with a copy of
    the message kept until the batch is written (:mod:`common.coord.resend` sends a lost one
    again), both in one step, and the message goes last. A batch sent again while still
    outstanding keeps its first enqueue time (``enqueued_at_ms`` when the task carries none):
    both deliveries then write byte-identical files (``_ingested_at`` is the enqueue time). If publishing fails, a
    batch this call made outstanding is forgotten again and the error raised.

    With a ``budget`` the batch is admitted against it (:mod:`common.coord.budget`; ``request``:
    the (bytes, batches) of the whole request it opens), else :class:`OverloadedError` and
    nothing is sent; without one it is only charged (hand-backs, which replace counted work).
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    given = task.enqueued_at_ms is not None
    task = task if given else replace(task, enqueued_at_ms=now_ms)
    kwargs = task.to_kwargs()
    request_bytes, request_batches = request or (len(task.payload), 1)
    added, score = admit(  # outstanding, charged and its copy kept, in one step
        client,
        task.batch_id,
        enqueued_ms=int(task.enqueued_at_ms or now_ms),
        size=len(task.payload),
        budget=budget,
        request_bytes=request_bytes,
        request_batches=request_batches,
        copy=orjson.dumps(kwargs),
        copy_ttl_s=ttl_s,
    )
    if not added:  # already outstanding: its first enqueue time wins; the copy is refreshed
        if not given:
            task = replace(task, enqueued_at_ms=score)
            kwargs = task.to_kwargs()
        retain(client, task.batch_id, kwargs, ttl_s)
    try:
        publish(kwargs)
    except BaseException:
        if added:
            release(client, task.batch_id)
        raise
    return task


class Producer:
    """Enqueues CloudEvents for the writers: ``Producer(settings).enqueue(events)``.

    ``target`` is a :class:`Settings` or a Redis URL (the other settings then come from the
    environment). ``client`` and ``publish`` replace the Redis client and the message sender
    (tests). Past the fleet's budget (``ICEFLEET_BUDGET_*``) :meth:`enqueue` raises
    :class:`~common.errors.OverloadedError` with the suggested delay, having sent nothing;
    ``overload_wait_s`` makes it wait and try again for up to that long first (telling
    ``on_overload`` each time). One producer per thread; :meth:`close` it, or use it as a context manager.
    """

    def __init__(
        self,
        target: Settings | str | None = None,
        *,
        client: redis.Redis | None = None,
        publish: Publisher | None = None,
        clock: Callable[[], float] = time.time,
        overload_wait_s: float = 0.0,
        on_overload: Callable[[OverloadedError], None] | None = None,
    ) -> None:
        if isinstance(target, str):
            target = load_settings(redis_url=target)
        self.settings = target if target is not None else load_settings()
        self.client = client or redis.Redis.from_url(self.settings.redis_url)
        self._owns_client = client is None
        self._publish: Publisher = publish or KombuPublisher(self.settings.redis_url)
        self._clock = clock
        self._bindings = BatchBindings(self.client, self.settings.dedup_window_s)
        self.last_batch_ids: list[str] = []
        self.budget = self.settings.budget
        self.overload_wait_s = overload_wait_s
        self.on_overload = on_overload
        if self.settings.ack_durability == "fsync":
            require_fsync(self.client)  # then Redis answers a write only once it is on disk

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
        the idempotency key: enqueueing the same events under the same id again lands them once;
        other events (or another table) under an id already used raise
        :class:`~common.errors.BatchConflictError`, and an id with a ``~`` (reserved for the ids
        icefleet derives) :class:`~common.errors.InvalidBatchIdError`. When the events exceed one
        batch they go as ``<id>~p0``, ``<id>~p1``, ... (see :attr:`last_batch_ids`), cut the same
        way when sent again under the same id.
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

    def enqueue_derived(
        self, events: Iterable[EventLike] | str | bytes, table: str | None, batch_id: str
    ) -> list[str]:
        """Enqueue under an id icefleet derived (a dead-letter replay's, :mod:`common.wire`);
        return the ids of the batches sent. Callers' ids go through :meth:`enqueue`."""
        return self._enqueue(events, table, check_derived_id(batch_id), derived=True)[1]

    def _enqueue(
        self,
        events: Iterable[EventLike] | str | bytes,
        table: str | None,
        batch_id: str | None,
        *,
        derived: bool = False,
    ) -> tuple[str, list[str]]:
        if table is not None:
            TableName.parse(table)  # InvalidIdentifierError says what is wrong with it
        if batch_id is not None and not derived:
            check_batch_id(batch_id)  # InvalidBatchIdError (a ValueError) says why not
        lines = _as_lines(events)
        if not lines:
            raise ValueError("nothing to enqueue: no events")
        parent = batch_id or str(uuid.uuid4())
        batches = split_lines(lines, self.settings.batch_max_events, self.settings.batch_max_bytes)
        if batch_id is not None:  # a fresh UUID needs no binding: the writer binds its parts
            batches = self._bind(parent, lines, batches, table)
        ids = part_ids(parent, len(batches))
        self.last_batch_ids = ids
        # packed first: the first part is admitted for the whole request, refused whole or taken
        packed = [pack("".join(f"{line}\n" for line in batch)) for batch in batches]
        request = (sum(len(payload) for payload, _ in packed), len(packed))
        for n, (child, (payload, encoding)) in enumerate(zip(ids, packed, strict=True)):
            task = WriteTask(child, payload, table, None, encoding)
            self._send(task, request if n == 0 else None)
        return parent, ids

    def _bind(
        self, batch_id: str, lines: list[str], batches: list[list[str]], table: str | None
    ) -> list[list[str]]:
        """Bind the id to the events (BatchConflictError if it names others); return the parts
        to send: cut as the first enqueue under this id cut them (common/coord/bindings.py)."""
        digest = content_digest("".join(f"{line}\n" for line in lines), table)
        sizes = [len(batch) for batch in batches] if len(batches) > 1 else []
        bound = self._bindings.bind(batch_id, digest, sizes)
        if list(bound.parts) == sizes:
            return batches
        cut, start = [], 0
        for size in bound.parts or (len(lines),):
            cut.append(lines[start : start + size])
            start += size
        return cut

    def _send(self, task: WriteTask, request: tuple[int, int] | None) -> None:
        """Send one part; the first (``request`` given) is checked against the budget, waiting
        as :attr:`overload_wait_s` allows, the others go (their request was admitted)."""
        deadline = time.monotonic() + self.overload_wait_s
        while True:
            try:
                enqueue_write_task(
                    self.client,
                    lambda kwargs: self._publish(WRITE_TASK, kwargs, INGEST_QUEUE),
                    task,
                    ttl_s=self.settings.dedup_window_s,
                    now_ms=int(self._clock() * 1000),
                    budget=self.budget if request is not None else None,
                    request=request,
                )
                break
            except OverloadedError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if self.on_overload is not None:
                    self.on_overload(exc)
                time.sleep(min(exc.retry_after_s, left))

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
