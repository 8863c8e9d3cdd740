"""Send again the batches whose write-task message was lost on its way to a writer.

kombu's Redis transport takes a message off its queue with ``BRPOP`` and records it as
unacknowledged only once the worker has read it: a worker killed in between loses the message,
and no visibility timeout brings it back. The batch then stays *outstanding* for ever. So the
producer keeps a copy of every write task's arguments (the payload zstd-compressed,
~90 kB per thousand demo events: :mod:`common.ingest.payloads`) under :func:`common.coord.keys.payload` until the
batch is written or dead-lettered (:meth:`common.coord.backlog.Outstanding.done` deletes it), and the
committer's periodic sweep calls :func:`resend_lost`.

A batch counts as lost when it has been outstanding for longer than ``older_than_s`` (the
visibility timeout and a minute: by then kombu has put back every message of a writer that died
holding it) while the ingest queue is empty (a batch still queued behind others is not lost). A
batch sent again that was not lost after all (a slow writer still on it) is harmless: writes are
idempotent by batch id and only the first registration counts. Each batch is sent again at most
once per ``older_than_s``, so a writer fleet that is down does not pile up copies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import redis

from common.coord import keys
from common.coord.backlog import queued
from common.wire import INGEST_QUEUE

DEFAULT_LIMIT = 100  # batches sent again per sweep at most


def retain(
    client: redis.Redis | Any, batch_id: str, task_kwargs: dict[str, Any], ttl_s: int
) -> None:
    """Keep a copy of a write task's arguments until the batch is written (``client`` may be a
    pipeline). ``ttl_s`` bounds what a batch nobody writes can hold (the dedup window)."""
    client.set(keys.payload(batch_id), orjson.dumps(task_kwargs), ex=ttl_s)


def resend_lost(
    client: redis.Redis,
    publish: Callable[[dict[str, Any]], Any],
    *,
    older_than_s: float,
    now_ms: int | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[str]:
    """Send again (``publish(task_kwargs)``) the write tasks of the batches that look lost;
    return their ids."""
    if queued(client, INGEST_QUEUE):
        return []
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - int(older_than_s * 1000)
    stale = client.zrangebyscore(keys.outstanding(), "-inf", cutoff, start=0, num=limit)
    sent: list[str] = []
    for raw_id in stale:
        batch_id = (
            raw_id.decode("utf-8", "surrogatepass") if isinstance(raw_id, bytes) else str(raw_id)
        )
        stored = client.get(keys.payload(batch_id))
        if stored is None:  # from a producer that keeps no copy, or written meanwhile
            continue
        if not client.set(keys.resent(batch_id), 1, nx=True, ex=max(1, int(older_than_s))):
            continue
        publish(orjson.loads(stored))
        sent.append(batch_id)
    return sent
